"""The one pass of repa-preprocess: source -> ADM crop -> frozen VAE + teachers -> shards.

Work plan (fixed by the settings, identical on every rank and on every rerun):

- the N source images (global index 0..N-1, `--limit` keeps the first N) are put in a write order: a fixed
  seeded permutation for indexable sources (so every shard mixes classes), the identity for streams;
- the order is cut into shards of `shard_size` records; shard j is `shard-{j:06d}.tar` and is done by rank
  j % world_size. Each rank writes its own shards; rank 0 writes the manifest once all are there.

One pass, overlapped: DataLoader workers read, decode and crop (`--num-workers`, preprocess/images.py), the
main thread runs the models (preprocess/models.py) on batches (autocast, channels-last, optional torch.compile) and a writer thread encodes and writes
records while the next batch is computed (preprocess/writing.py). Options and the plan: preprocess/plan.py.

Reruns (preprocess/resume.py): rank 0 holds the output lock for the whole run; the folder must be ours, the
settings and the source fingerprint must match `preprocess.json` while finished shards exist; the settings
are written once the models are loaded; finished shards are verified and bad ones redone; every other shard
is redone. Skipped bad images (`--skip-bad`) are listed per shard in `preprocess-skipped/shard-XXXXXX.json`,
written before the shard is closed, and merged into the manifest. SIGTERM/SIGINT/`--requeue-signal` stop
the pass cleanly (preprocess/stop.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from repa.shards import completed_shards, finalize_manifest
from repa.shards import records as R

from . import resume
from .captions import open_captioned_source, text_stage_for
from .images import _loader
from .models import Models, _fields
from .plan import Dist, Options, _device, _resolve, _settings, default_out, init_dist, shard_name, shard_plan
from .resume import (SETTINGS_FILE, PreprocessError, bad_image_error, repair,  # noqa: F401  (re-exported)
                     source_identity, write_settings)
from .sources import Source, open_source
from .stop import StopFlag, parse_signal
from .writing import _check_complete, _ShardWriters  # noqa: F401  (re-exported)

__all__ = ["Options", "PreprocessError", "run", "shard_plan", "shard_name", "default_out"]


# ----------------------------------------------------------------------------------------------------------
# setup: the source, the output folder

def _num_images(source: Source, limit: int | None) -> int:
    try:
        n = len(source)
    except Exception:  # noqa: BLE001 - a stream of unknown length: --limit says how many to take
        if limit is None:
            raise
        return limit
    n = min(n, limit) if limit else n
    if n < 1:
        raise PreprocessError(f"no images found in {source.spec}: nothing to preprocess. Check the source "
                              "(path, --split, --data-dir) and rerun")
    return n


def _open(opts: Options) -> tuple[Source, int, str]:
    source = open_captioned_source(opts) or open_source(
        opts.source, data_dir=opts.data_dir, split=opts.split, image_column=opts.image_column,
        label_column=opts.label_column, streaming=opts.streaming, num_classes=opts.num_classes,
        skip_bad=opts.skip_bad, res=opts.res)
    source.exif_transpose = opts.exif_transpose
    n = _num_images(source, opts.limit)
    return source, n, opts.out or default_out(source, opts.res)


def _take_output(out: str, opts: Options, fp: dict, listing, dist: Dist, echo) -> tuple[Any, dict]:
    """Rank 0: refuse a folder that is not ours, take the lock, clean up killed writers' temps, refuse a
    rerun that would mix datasets. Every rank learns whether rank 0 succeeded. -> (lock or None, record)."""
    record = resume.settings_record(_settings(opts), fp)
    lock, err = None, None
    if dist.rank == 0:
        try:
            resume.check_ours(out, opts.storage_options)
            lock = resume.take_lock(out, opts.storage_options, echo)
            resume.cleanup(out, opts.storage_options)
            resume.check_resume(out, record, listing, opts.storage_options, echo)
        except BaseException as e:
            if lock is not None:
                lock.release()
            if not isinstance(e, PreprocessError):
                raise
            err = e
    if not dist.all_ok(err is None):
        raise err or PreprocessError(f"rank 0 refused to write into {out}; see its error message")
    return lock, record


def _resume_plan(out, plan, fields, opts: Options, dist: Dist, echo) -> list[int]:
    """After the settings are written: verify (and drop) finished shards of this rank, -> shards to do."""

    so = opts.storage_options
    done = completed_shards(out, storage_options=so)
    own = {shard_name(j) for j in range(len(plan)) if j % dist.world_size == dist.rank}
    if done:
        repair(out, {k: v for k, v in done.items() if k in own}, fields, so, echo,
               progress=opts.progress and dist.rank == 0, quick=not opts.verify)
        done = completed_shards(out, storage_options=so)
    return [j for j in range(len(plan)) if shard_name(j) in own and shard_name(j) not in done]

# ----------------------------------------------------------------------------------------------------------
# the pass

def run(opts: Options, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pass; returns the summary dict (rank 0: whole set; other ranks: their part).

    A stop signal (SIGTERM, SIGINT, --requeue-signal) ends it early: the summary then has "stopped" (the
    signal's name) and no manifest is written; the same command finishes the set."""
    t0 = time.time()
    dist = init_dist()
    device = _device(opts, dist)
    opts = _resolve(opts, device)
    source, n, out = _open(opts)
    for line in source.notes() if dist.rank == 0 else ():  # e.g. symlinked repeats left out of a listing
        echo(line)
    fp, listing = source_identity(source) if dist.rank == 0 else ({}, None)
    lock, record = _take_output(out, opts, fp, listing, dist, echo)
    try:
        models = Models(opts, device)  # before the settings are written: a failed load leaves nothing behind
        fields = _fields(opts, models(torch.zeros(1, 3, opts.res, opts.res, dtype=torch.uint8)))
        models.text = text_stage_for(source, opts, device)  # captioned sources: loads the text encoder now
        if models.text is not None:
            fields.update(models.text.fields(opts.feature_codec))
        if dist.rank == 0:
            write_settings(out, record, listing, opts.storage_options)
        dist.barrier()
        plan = shard_plan(n, opts.shard_size, shuffle=source.indexable, seed=opts.seed)
        mine = _resume_plan(out, plan, fields, opts, dist, echo)
        dist.barrier()
        summary = _pass(opts, source, n, out, plan, mine, models, fields, device, dist, echo)
        if not dist.all_ok(summary["stopped"] is None):  # every rank agrees: no manifest if any stopped
            summary["stopped"] = summary["stopped"] or "a signal on another rank"
        summary["seconds"] = time.time() - t0
        if dist.rank == 0 and not summary["stopped"]:
            summary.update(_finalize(opts, source, n, out, plan, models, fields))
        return summary
    finally:
        if lock is not None:
            lock.release()

def _pass(opts, source, n, out, plan, mine, models, fields, device, dist, echo) -> dict:
    """Compute and write the shards `mine`; -> this rank's summary (records/bytes/shards written, stopped)."""
    keys = np.concatenate([plan[j] for j in mine]) if mine else np.zeros(0, np.int64)
    shard_index = np.full(n, -1, dtype=np.int64)
    for j, ks in enumerate(plan):
        shard_index[ks] = j
    size_of = {j: len(plan[j]) for j in mine}
    written = {"records": 0, "bytes": 0, "shards": 0}

    def closed(j, info):
        written["records"] += info.num_records
        written["bytes"] += info.nbytes
        written["shards"] += 1
        if opts.on_shard_done is not None:
            opts.on_shard_done(j)

    writer = _ShardWriters(opts, out, fields, lambda k: int(shard_index[k]), size_of, closed)
    loop = {"seconds": 0.0, "skipped": 0, "stopped": None}
    if len(keys):
        with StopFlag(parse_signal(opts.requeue_signal)) as stop:
            loop = _loop(opts, _loader(opts, source, n, keys, device, stop), models, writer, stop, out,
                         len(keys), dist, echo)
        if not loop["stopped"] and writer.open:  # only a stream shorter than announced / than --limit
            missing = sum(size_of[j] - writer.seen[j] for j in writer.open)
            writer.abort()
            raise PreprocessError(f"{source.spec}: the source ended {missing} images short of the {n} planned "
                                  f"(--limit or the announced size); rerun with a smaller --limit into a new --out")
    if loop["stopped"]:
        echo(f"stopped by {loop['stopped']}: {written['shards']} shards finished by this run are kept, the "
             f"unfinished ones were dropped; rerun the same command to finish {out}")
    return {"out": out, "records_written": written["records"], "bytes_written": written["bytes"],
            "shards_written": written["shards"], "loop_seconds": loop["seconds"],
            "images_per_s": len(keys) / loop["seconds"] if loop["seconds"] else 0.0,
            "skipped_this_run": loop["skipped"], "stopped": loop["stopped"]}


def _loop(opts, loader, models, writer, stop: StopFlag, out, n_todo, dist, echo) -> dict:
    """Batches -> models -> writer thread. A bad image (strict) or a stop signal ends it after the batches
    already handed to the writer are written; unfinished shards are then dropped."""
    from tqdm.auto import tqdm
    bar = tqdm(total=n_todo, unit="img", desc=f"repa-preprocess {out}",
               disable=not opts.progress or dist.rank != 0, smoothing=0.05)
    bad, skipped, t = None, 0, time.time()
    writer.start()
    try:
        for batch in loader:
            if batch["errors"] and not opts.skip_bad:
                bad = batch["errors"][0]
                break
            for key, path, msg in batch["errors"]:
                echo(f"skipping bad image {path}: {msg}")
                skipped += 1
            arrays = models(batch["images"]) if batch["images"] is not None else {}
            if getattr(models, "text", None) is not None and batch["ok_keys"]:  # text.<k> + num_captions
                arrays.update(models.text(batch["ok_keys"]))
            writer.put((batch["ok_keys"], batch["labels"], arrays, batch["errors"]))
            bar.update(len(batch["keys"]))
            if stop.signum:
                break
        writer.finish()  # what was handed over is written: shards it completes are published
    except BaseException:
        writer.cancel()
        writer.abort()
        raise
    finally:
        bar.close()
    if bad is not None or stop.signum:
        writer.abort()  # the unfinished shards: only their temp files existed
    if bad is not None:
        raise bad_image_error(bad[1], bad[2], out, opts.storage_options)
    return {"seconds": time.time() - t, "skipped": skipped, "stopped": stop.name}


def _finalize(opts, source, n, out, plan, models, fields) -> dict:
    """Rank 0, once every shard is there: check the accounting and write the manifest."""
    so = opts.storage_options
    skipped = _check_complete(out, plan, so)
    vae_prov, teacher_prov = models.provenance()
    provenance = {
        "source": opts.source, "resolution": opts.res, "crop": getattr(source, "crop", "adm"), "vae": vae_prov,
        "latent_size": int(fields[R.MOMENTS].shape[-1]), "teachers": teacher_prov,
        "num_classes": int(source.num_classes), "flip": bool(opts.flip),
        "haste": ({"teacher": 0, "start_block": models.haste_block,
                   "attn_blocks": list(range(models.haste_block, models.teachers[0].depth))}
                  if opts.haste else None),
        "skipped": skipped, "repa_version": _version(),
        "precision": {"vae": opts.vae_precision, "teachers": opts.precision},
        "order": {"shuffled": bool(source.indexable), "seed": opts.seed, "records_per_shard": opts.shard_size},
    }
    if getattr(models, "text", None) is not None:  # writes captions.json + empty_context before the manifest
        provenance["text"] = models.text.finalize(out, so, n)
    # with skipped images the key set has holes: _check_complete did the accounting per shard
    manifest = finalize_manifest(out, fields, provenance, expected_records=None if skipped else n,
                                 storage_options=so)
    total = sum(s.nbytes for s in manifest.shards)
    return {"records": manifest.num_records, "bytes": total, "bytes_per_record": total / max(1, manifest.num_records),
            "skipped": len(skipped), "shards": len(manifest.shards)}

def _version() -> str:
    try:
        from importlib.metadata import version
        return version("repa")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"
