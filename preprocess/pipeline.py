"""The one pass of repa-preprocess: source -> ADM crop -> frozen VAE + teachers -> shards.

Work plan (fixed by the settings, identical on every rank and on every rerun):

- the N source images (global index 0..N-1, `--limit` keeps the first N) are put in a write order: a fixed
  seeded permutation for indexable sources (so every shard mixes classes), the identity for streams;
- the order is cut into shards of `shard_size` records; shard j is `shard-{j:06d}.tar` and is done by rank
  j % world_size. Each rank writes its own shards; rank 0 writes the manifest once all are there.

One pass, overlapped: DataLoader workers read, decode and crop (`--num-workers`), the main thread runs the
models on batches (autocast, channels-last, optional torch.compile) and a writer thread encodes and writes
records while the next batch is computed.

Reruns (preprocess/resume.py): rank 0 holds the output lock for the whole run; the folder must be ours, the
settings and the source fingerprint must match `preprocess.json` while finished shards exist; the settings
are written once the models are loaded; finished shards are verified and bad ones redone; every other shard
is redone. Skipped bad images (`--skip-bad`) are listed per shard in `preprocess-skipped/shard-XXXXXX.json`,
written before the shard is closed, and merged into the manifest. SIGTERM/SIGINT/`--requeue-signal` stop
the pass cleanly (preprocess/stop.py).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .crop import adm_center_crop, check_resolution
from .resume import SETTINGS_FILE, PreprocessError  # noqa: F401  (re-exported)
from .resume import join as _join
from .resume import read_json as _read_json
from .resume import write_json as _write_json
from .sources import Source, open_source
from .stop import StopFlag, parse_signal

SKIP_DIR = "preprocess-skipped"
SHARD_PREFIX = "shard"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURE_CODECS = ("bf16", "fp16", "fp32", "int8")

__all__ = ["Options", "PreprocessError", "run", "shard_plan", "shard_name", "default_out"]


@dataclass
class Options:
    """Everything repa-preprocess needs (the CLI flags). Fields marked in `FINGERPRINT` fix the output."""

    source: str
    res: int = 256
    out: str | None = None
    data_dir: str | None = None
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool | None = None
    num_classes: int | None = None
    vae: str = "ema"
    enc_type: str = "dinov2-vit-b"
    precision: str = "auto"          # teachers: fp16 on CUDA (the reference's autocast), fp32 on CPU
    vae_precision: str = "fp32"      # the reference encodes latents in fp32
    feature_codec: str = "bf16"
    flip: bool = False
    haste: bool = False
    shard_size: int = 1000
    seed: int = 0
    limit: int | None = None
    exif_transpose: bool = True
    skip_bad: bool = False
    batch_size: int = 64
    num_workers: int | None = None
    compile: bool = False
    device: str | None = None
    storage_options: dict | None = None
    progress: bool = True
    verify: bool = True              # resume: fully verify the finished shards, rewrite those that fail
    requeue_signal: str | None = "USR1"  # stops cleanly like SIGTERM/SIGINT (SLURM --signal=B:USR1@120)
    # test hook: called with the shard index after each shard is closed (lets tests simulate a crash)
    on_shard_done: Callable[[int], None] | None = field(default=None, repr=False, compare=False)


FINGERPRINT = ("source", "res", "data_dir", "split", "image_column", "label_column", "streaming",
               "num_classes", "vae", "enc_type", "precision", "vae_precision", "feature_codec", "flip",
               "haste", "shard_size", "seed", "limit", "exif_transpose")


def default_out(source: Source, res: int) -> str:
    """`shards/<source>-<res>`: `repa-train --shards shards/` finds it."""
    return os.path.join("shards", f"{source.name}-{res}")


def shard_name(j: int) -> str:
    return f"{SHARD_PREFIX}-{j:06d}.tar"


def shard_plan(n: int, shard_size: int, *, shuffle: bool, seed: int) -> list[np.ndarray]:
    """Global keys of every shard, in write order: a seeded permutation (or identity) cut into chunks."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[i: i + shard_size] for i in range(0, n, shard_size)]


# ----------------------------------------------------------------------------------------------------------
# distributed context

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def broadcast_ok(self, ok: bool) -> bool:
        """True on every rank iff every rank's `ok` is True (used to stop all ranks on a setup error)."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return ok
        t = torch.tensor([0 if ok else 1], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return int(t.item()) == 0


def init_dist() -> Dist:
    """RANK/WORLD_SIZE from torchrun or `accelerate launch`; start a process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # ranks finish their shards at different times: the final barrier may wait for hours
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=24))
    return Dist(rank, world, local_rank)


# ----------------------------------------------------------------------------------------------------------
# decode + crop in DataLoader workers

def _load_one(source: Source, key: int, record_fn: Callable[[], Any], res: int):
    """-> (key, uint8 CHW tensor or None, label, None or (image name, error)). Never raises."""
    try:
        img, label, _ = source.decode(record_fn())
        arr = adm_center_crop(img, res)
        return key, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), int(label), None
    except Exception as e:  # noqa: BLE001 - reported with the image's name by the main process
        return key, None, -1, (source.describe(key), f"{type(e).__name__}: {e}")


class _MapImages(Dataset):
    def __init__(self, source: Source, keys: np.ndarray, res: int):
        self.source, self.keys, self.res = source, keys, res

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = int(self.keys[i])
        return _load_one(self.source, key, lambda: self.source.get(key), self.res)


class _StreamImages(IterableDataset):
    """The stream positions where `mask` is True. Worker w decodes global batches w, w+W, w+2W, ... so that
    the DataLoader's round-robin over workers returns the items in stream order."""

    def __init__(self, source: Source, mask: np.ndarray, res: int, batch_size: int):
        self.source, self.mask, self.res, self.bs = source, mask, res, batch_size

    def __iter__(self):
        info = get_worker_info()
        nw, w = (info.num_workers, info.id) if info else (1, 0)
        hits = np.flatnonzero(self.mask)
        if not len(hits):
            return
        first, last, pos = int(hits[0]), int(hits[-1]), 0
        for key, record in self.source.stream(first):
            if key > last:
                break
            if not self.mask[key]:
                continue
            if (pos // self.bs) % nw == w:
                yield _load_one(self.source, key, lambda r=record: r, self.res)
            pos += 1


def _collate(items):
    keys = [it[0] for it in items]
    ok = [it for it in items if it[1] is not None]
    images = torch.stack([it[1] for it in ok]) if ok else None
    return {"keys": keys, "ok_keys": [it[0] for it in ok], "labels": [it[2] for it in ok],
            "images": images, "errors": [(it[0], *it[3]) for it in items if it[1] is None]}


# ----------------------------------------------------------------------------------------------------------
# models

def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _load_teachers(enc_type: str, res: int, device: torch.device, compile: bool) -> list:
    names = [e.strip() for e in enc_type.split(",") if e.strip()]
    if not names or names == ["none"]:
        return []
    if "none" in names:
        raise PreprocessError("--enc-type: 'none' cannot be combined with other teachers")
    from . import teachers as T
    return list(T.load_teachers(",".join(names), res, device, channels_last=device.type == "cuda",
                                compile=compile))


class Models:
    """The frozen VAE and teachers, run on uint8 batches; returns the per-record arrays of one batch."""

    def __init__(self, opts: Options, device: torch.device):
        from .vae import load_vae
        opts = _resolve(opts, device)
        self.device = device
        self.opts = opts
        self.vae = load_vae(opts.vae, device)
        self.teachers = _load_teachers(opts.enc_type, opts.res, device, opts.compile)
        self.precision = opts.precision
        self.encode = self.vae.encode_moments
        self.haste_block = None
        if opts.haste:
            if not self.teachers or not hasattr(self.teachers[0], "residual_before"):
                raise PreprocessError("--haste needs a first teacher with residual_before() (a dinov2 "
                                      "teacher, e.g. --enc-type dinov2-vit-b)")
            # HASTE aligns the teacher's last four blocks (DINOv2-B: blocks 8-11, docs/reference.md §7.3); the cache
            # holds the residual stream entering the first of them.
            self.haste_block = max(0, self.teachers[0].depth - 4)
        if opts.compile:  # the teachers compile their own forward (load option)
            self.encode = torch.compile(self.encode)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B,3,R,R) -> {"moments", "feat.i", ["moments_flip", "feat_flip.i", "haste.0"]} on CPU."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.opts.flip:
            x = torch.cat([x, x.flip(-1)]).contiguous(memory_format=torch.channels_last)
        out = {}
        with _autocast(self.device, self.opts.vae_precision):
            m = self.encode(x.float() / 127.5 - 1).float()
        out["moments"] = m[:n]
        if self.opts.flip:
            out["moments_flip"] = m[n:]
        with _autocast(self.device, self.precision):
            for i, fn in enumerate(self.teachers):
                f = fn(x).float()
                out[f"feat.{i}"] = f[:n]
                if self.opts.flip:
                    out[f"feat_flip.{i}"] = f[n:]
            if self.haste_block is not None:
                out["haste.0"] = self.teachers[0].residual_before(x[:n], self.haste_block).float()
        return {k: v.cpu() for k, v in out.items()}

    def provenance(self) -> tuple[dict, list]:
        vae = dict(self.vae.provenance)
        teachers = []
        for i, t in enumerate(self.teachers):
            p = dict(t.provenance)
            p["field"] = f"feat.{i}"
            p["codec"] = self.opts.feature_codec
            teachers.append(p)
        return vae, teachers


def _fields(opts: Options, sample: dict[str, torch.Tensor]) -> dict:
    """Field specs (CONTRACTS.md order: moments, label, feat.i, moments_flip, feat_flip.i, haste.i)."""
    from repa.shards.schema import FieldSpec, feature_spec
    fields = {"moments": FieldSpec(tuple(sample["moments"].shape[1:]), "float32", "raw"),
              "label": FieldSpec((), "int64", "raw")}
    for name, t in sample.items():
        if name.startswith(("feat.", "feat_flip.")):
            fields[name] = feature_spec(tuple(t.shape[1:]), opts.feature_codec)
        elif name == "haste.0":
            fields[name] = FieldSpec(tuple(t.shape[1:]), "float16", "fp16")
    if "moments_flip" in sample:
        fields["moments_flip"] = fields["moments"]
    return fields


# ----------------------------------------------------------------------------------------------------------
# writer thread

class _ShardWriters(threading.Thread):
    """Encodes and writes records in the background. Shard j is closed once all its keys are accounted for
    (written or skipped); its skip list is written just before, so a complete shard always has it."""

    def __init__(self, opts: Options, out: str, fields, shard_of: Callable[[int], int], size_of: dict,
                 on_closed: Callable[[int, Any], None]):
        super().__init__(daemon=True)
        self.opts, self.out, self.fields = opts, out, fields
        self.shard_of, self.size_of, self.on_closed = shard_of, size_of, on_closed
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.open: dict[int, Any] = {}
        self.seen: dict[int, int] = {}
        self.skipped: dict[int, list] = {}
        self.error: BaseException | None = None
        self.cancelled = threading.Event()

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self):
        try:
            while (item := self.q.get()) is not None and not self.cancelled.is_set():
                self._write_batch(*item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by put()/finish()
            self.error = e

    def finish(self):
        """Write what is queued, stop, re-raise a writing error."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def cancel(self):
        """Stop after the current batch (error path); the caller then aborts the open shards."""
        self.cancelled.set()
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.join()

    def _writer(self, j: int):
        if j not in self.open:
            from repa.shards import ShardWriter
            self.open[j] = ShardWriter(self.out, self.fields, shard_name=shard_name(j),
                                       storage_options=self.opts.storage_options)
            self.seen[j] = 0
            self.skipped[j] = []
        return self.open[j]

    def _write_batch(self, keys, labels, arrays, skipped):
        for i, key in enumerate(keys):
            sample = {name: a[i] for name, a in arrays.items()}
            sample["label"] = np.int64(labels[i])
            j = self.shard_of(key)
            self._writer(j).write(int(key), sample)
            self._count(j)
        for key, path, msg in skipped:
            j = self.shard_of(key)
            self._writer(j)
            self.skipped[j].append({"key": int(key), "path": path, "error": msg})
            self._count(j)

    def _count(self, j: int):
        self.seen[j] += 1
        if self.seen[j] == self.size_of[j]:
            _write_json(_join(self.out, SKIP_DIR, f"{shard_name(j)[:-4]}.json"),
                        sorted(self.skipped[j], key=lambda s: s["key"]), self.opts.storage_options)
            info = self.open.pop(j).close()
            self.on_closed(j, info)

    def abort(self):
        for w in self.open.values():
            try:
                w.abort()
            except Exception:  # noqa: BLE001 - best effort cleanup on the error path
                pass
        self.open.clear()


# ----------------------------------------------------------------------------------------------------------
# setup: settings, source, the output folder

def _settings(opts: Options) -> dict:
    d = {k: getattr(opts, k) for k in FINGERPRINT}
    if d["data_dir"]:
        d["data_dir"] = os.path.abspath(d["data_dir"])
    return d


def _resolve(opts: Options, device: torch.device) -> Options:
    opts = dataclasses.replace(opts)
    opts.res = check_resolution(opts.res)
    if opts.precision == "auto":
        opts.precision = "fp16" if device.type == "cuda" else "fp32"
    for flag, v in (("--precision", opts.precision), ("--vae-precision", opts.vae_precision)):
        if v not in PRECISIONS:
            raise PreprocessError(f"{flag} must be one of fp32, bf16, fp16 (or auto), got {v!r}")
    if opts.feature_codec not in FEATURE_CODECS:
        raise PreprocessError(f"--feature-codec must be one of {', '.join(FEATURE_CODECS)}, got {opts.feature_codec!r}")
    if opts.shard_size < 1 or opts.batch_size < 1:
        raise PreprocessError("--shard-size and --batch-size must be >= 1")
    if opts.limit is not None and opts.limit < 1:
        raise PreprocessError("--limit must be >= 1")
    parse_signal(opts.requeue_signal)
    return opts


def _device(opts: Options, dist: Dist) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


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
    source = open_source(opts.source, data_dir=opts.data_dir, split=opts.split, image_column=opts.image_column,
                         label_column=opts.label_column, streaming=opts.streaming, num_classes=opts.num_classes,
                         skip_bad=opts.skip_bad, res=opts.res)
    source.exif_transpose = opts.exif_transpose
    n = _num_images(source, opts.limit)
    return source, n, opts.out or default_out(source, opts.res)


def _take_output(out: str, opts: Options, fp: dict, listing, dist: Dist, echo) -> tuple[Any, dict]:
    """Rank 0: refuse a folder that is not ours, take the lock, clean up killed writers' temps, refuse a
    rerun that would mix datasets. Every rank learns whether rank 0 succeeded. -> (lock or None, record)."""
    from . import resume
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
    if not dist.broadcast_ok(err is None):
        raise err or PreprocessError(f"rank 0 refused to write into {out}; see its error message")
    return lock, record


def _resume_plan(out, plan, fields, opts: Options, dist: Dist, echo) -> list[int]:
    """After the settings are written: verify (and drop) finished shards of this rank, -> shards to do."""
    from repa.shards import completed_shards

    from .resume import repair
    so = opts.storage_options
    done = completed_shards(out, storage_options=so)
    own = {shard_name(j) for j in range(len(plan)) if j % dist.world == dist.rank}
    if opts.verify and done:
        repair(out, {k: v for k, v in done.items() if k in own}, fields, so, echo,
               progress=opts.progress and dist.rank == 0)
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
    from .resume import source_identity, write_settings
    fp, listing = source_identity(source) if dist.rank == 0 else ({}, None)
    lock, record = _take_output(out, opts, fp, listing, dist, echo)
    try:
        models = Models(opts, device)  # before the settings are written: a failed load leaves nothing behind
        fields = _fields(opts, models(torch.zeros(1, 3, opts.res, opts.res, dtype=torch.uint8)))
        if dist.rank == 0:
            write_settings(out, record, listing, opts.storage_options)
        dist.barrier()
        plan = shard_plan(n, opts.shard_size, shuffle=source.indexable, seed=opts.seed)
        mine = _resume_plan(out, plan, fields, opts, dist, echo)
        dist.barrier()
        summary = _pass(opts, source, n, out, plan, mine, models, fields, device, dist, echo)
        if not dist.broadcast_ok(summary["stopped"] is None):  # every rank agrees: no manifest if any stopped
            summary["stopped"] = summary["stopped"] or "a signal on another rank"
        summary["seconds"] = time.time() - t0
        if dist.rank == 0 and not summary["stopped"]:
            summary.update(_finalize(opts, source, n, out, plan, models, fields))
        return summary
    finally:
        if lock is not None:
            lock.release()


def _loader(opts: Options, source: Source, n: int, keys: np.ndarray, device, stop: StopFlag) -> DataLoader:
    if source.indexable:
        ds = _MapImages(source, keys, opts.res)
    else:
        mask = np.zeros(n, dtype=bool)
        mask[keys] = True
        ds = _StreamImages(source, mask, opts.res, opts.batch_size)
    n_workers = opts.num_workers if opts.num_workers is not None else min(8, os.cpu_count() or 1)
    return DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=n_workers, collate_fn=_collate,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if n_workers else None,
                      persistent_workers=False, worker_init_fn=stop.worker_init() if n_workers else None)


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
        from .resume import bad_image_error
        raise bad_image_error(bad[1], bad[2], out, opts.storage_options)
    return {"seconds": time.time() - t, "skipped": skipped, "stopped": stop.name}


def _finalize(opts, source, n, out, plan, models, fields) -> dict:
    """Rank 0, once every shard is there: check the accounting and write the manifest."""
    from repa.shards import finalize_manifest
    so = opts.storage_options
    skipped = _check_complete(out, plan, so)
    vae_prov, teacher_prov = models.provenance()
    provenance = {
        "source": opts.source, "resolution": opts.res, "crop": "adm", "vae": vae_prov,
        "latent_size": int(fields["moments"].shape[-1]), "teachers": teacher_prov,
        "num_classes": int(source.num_classes), "flip": bool(opts.flip),
        "haste": ({"teacher": 0, "start_block": models.haste_block,
                   "attn_blocks": list(range(models.haste_block, models.teachers[0].depth))}
                  if opts.haste else None),
        "skipped": skipped, "repa_version": _version(),
        "precision": {"vae": opts.vae_precision, "teachers": opts.precision},
        "order": {"shuffled": bool(source.indexable), "seed": opts.seed, "records_per_shard": opts.shard_size},
    }
    # with skipped images the key set has holes: _check_complete did the accounting per shard
    manifest = finalize_manifest(out, fields, provenance, expected_records=None if skipped else n,
                                 storage_options=so)
    total = sum(s.nbytes for s in manifest.shards)
    return {"records": manifest.num_records, "bytes": total, "bytes_per_record": total / max(1, manifest.num_records),
            "skipped": len(skipped), "shards": len(manifest.shards)}


def _check_complete(out: str, plan: list[np.ndarray], so) -> list[dict]:
    """Every planned shard is complete and holds its keys minus its skipped ones; returns all skipped."""
    from repa.shards import completed_shards
    done = completed_shards(out, storage_options=so)
    skipped, problems = [], []
    for j, keys in enumerate(plan):
        info = done.get(shard_name(j))
        sk = _read_json(_join(out, SKIP_DIR, f"{shard_name(j)[:-4]}.json"), so) if info else None
        if info is None or sk is None:
            problems.append(f"{shard_name(j)} is missing")
        elif info.num_records + len(sk) != len(keys):
            problems.append(f"{shard_name(j)} has {info.num_records} records + {len(sk)} skipped, "
                            f"planned {len(keys)}")
        else:
            skipped += sk
    if problems:
        raise PreprocessError(f"{out}: the shard set is incomplete ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); rerun the same command to finish it")
    return sorted(skipped, key=lambda s: s["key"])


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("repa")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"
