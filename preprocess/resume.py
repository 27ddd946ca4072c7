"""What a rerun of repa-preprocess may reuse: the output lock, the ownership check, the settings and source
fingerprints, and the repair of shards that fail verification.

The rules (each one keeps a rerun from mixing two datasets or deleting what is not ours):

- one writer per `--out`: rank 0 holds `repa.shards.lock.OutputLock` for the whole run; the checks below and
  the settings write happen under it, so two runs can never both pass the check;
- `--out` must be empty, missing, or a repa shard set (it holds `preprocess.json` or `manifest.json`): any other
  non-empty folder is refused before anything is written into it;
- `preprocess.json` stores the settings and a fingerprint of the source (the listing of a folder: sorted
  relative paths + sizes; an HF dataset's fingerprint/revision). A rerun with other settings or a changed
  source is refused while the folder holds finished shards, naming the first differences; with no finished
  shard nothing can be mixed and the new settings simply replace the old ones (so a run that failed while
  loading its models does not lock the folder against the corrected command);
- the settings are written once the models are loaded (`write_settings`), before the first shard;
- finished shards are verified on resume (size and every record's CRC): a shard that fails is removed (with
  its sidecar and the now stale manifest) and rewritten by the same run.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from repa.shards import completed_shards, storage, writer
from repa.shards.lock import LOCK_NAME, LockHeld, OutputLock
from repa.shards.tario import RecordCodec
from repa.shards.verify import verify_shard

from .sources import Source, diff_listings

SETTINGS_FILE = "preprocess.json"
SOURCE_FILE = "preprocess-source.json"   # the full source listing (names the differences of a changed source)
MANIFEST = "manifest.json"
FORMAT = "repa-preprocess/1"


class PreprocessError(RuntimeError):
    """A run cannot start or continue; the message names the file/flag and what to do."""


# ---------------------------------------------------------------------------------------------- small files

def read_json(url: str, storage_options: dict | None) -> Any | None:
    if storage.size(url, storage_options) is None:
        return None
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except ValueError as e:
        raise PreprocessError(f"{url} is not valid JSON ({e}); delete it, or choose another --out") from e


def write_json(url: str, obj: Any, storage_options: dict | None, compact: bool = False) -> None:
    """Atomic (temp file + rename locally, one PUT on object stores). `compact`: one line (big listings)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1, sort_keys=True)
    storage.write_bytes(url, text.encode(), storage_options)


def join(url: str, *parts: str) -> str:
    for p in parts:
        url = storage.join(url, p)
    return url


# ---------------------------------------------------------------------------------------------- ownership + lock

def check_ours(out: str, storage_options: dict | None) -> None:
    """Refuse a non-empty `--out` that is not a repa shard set, before anything is written into it."""
    names = [n for n in storage.listdir(out, storage_options) if n != LOCK_NAME and not storage.is_own_temp(n)]
    if not names or {SETTINGS_FILE, MANIFEST, SOURCE_FILE} & set(names):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise PreprocessError(
        f"--out {out} is not empty and is not a repa shard set (no {SETTINGS_FILE} or {MANIFEST}; it holds "
        f"{shown}). repa-preprocess writes and removes files in its output folder, so it will not use this "
        "one: choose a new or empty folder with --out NEW")


def take_lock(out: str, storage_options: dict | None, echo: Callable[[str], None]):
    """The output lock (held by rank 0 for the run); a dead holder's lock is taken over with a warning."""
    lock = OutputLock(out, stage="repa-preprocess", storage_options=storage_options)
    try:
        lock.acquire()
    except LockHeld as e:
        raise PreprocessError(str(e)) from None
    p = lock.previous
    if p:
        echo(f"warning: took over the output lock {lock.path} of a run that did not release it (killed?): "
             f"{p.get('stage', '?')} pid {p.get('pid', '?')} on {p.get('host', '?')}, started "
             f"{p.get('started', '?')}; resuming its work")
    return lock


def cleanup(out: str, storage_options: dict | None) -> None:
    """Remove the temp files of killed writers (only our own temp-name pattern) and, on object stores, this
    set's leaked local temp files and unfinished multipart uploads. Runs under the lock, before any write."""
    if storage.is_remote(out):
        fn = getattr(writer, "cleanup_stale_uploads", None) or getattr(storage, "cleanup_stale_uploads", None)
        if fn is not None:
            fn(out, storage_options)
        return
    for n in storage.listdir(out, storage_options):
        if storage.is_own_temp(n):
            storage.remove(storage.join(out, n), storage_options)


# ---------------------------------------------------------------------------------------------- fingerprints

def source_identity(source: Source) -> tuple[dict, list | None]:
    """(Source.fingerprint(): a small dict, equal iff the same images under the same keys; the listing
    [[relative path, size], ...] of a folder source, kept to name the differences; else None)."""
    listing = source.listing() if hasattr(source, "listing") else None
    return source.fingerprint(), listing


def settings_record(settings: dict, fp: dict) -> dict:
    return {"format": FORMAT, "settings": settings, "source": fp}


def _source_changes(theirs: dict, fp: dict, old_listing: dict | None, listing: list | None) -> list[str]:
    if old_listing is not None and listing is not None:
        lines = diff_listings(old_listing.get("listing") or [], listing)
        if lines:
            return lines
    return [f"{k}: {theirs.get(k)!r} -> {fp.get(k)!r}" for k in sorted(set(theirs) | set(fp))
            if theirs.get(k) != fp.get(k)]


def check_resume(out: str, mine: dict, listing: list | None, storage_options: dict | None,
                 echo: Callable[[str], None]) -> None:
    """Refuse a rerun that would mix datasets (see the module docstring). Call under the lock."""
    theirs = read_json(join(out, SETTINGS_FILE), storage_options)
    if theirs is None:
        if storage.size(join(out, MANIFEST), storage_options) is not None:
            raise PreprocessError(f"{out} already holds a shard set (manifest.json) not made by this "
                                  f"repa-preprocess version ({SETTINGS_FILE} missing); choose another --out")
        return
    if theirs == mine:
        return
    finished = completed_shards(out, storage_options=storage_options)
    if not finished:
        echo(f"note: {out} holds no finished shard yet: its {SETTINGS_FILE} is replaced by this run's settings")
        return
    a, b = theirs.get("settings", {}), mine["settings"]
    diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff or theirs.get("format") != mine["format"]:
        raise PreprocessError(
            f"{join(out, SETTINGS_FILE)} was written with different settings ({'; '.join(diff) or 'format'}); "
            f"resuming would mix two datasets. Rerun with the original flags, choose another --out, or delete "
            f"{out} to start over")
    if "source" not in theirs:  # written before sources were fingerprinted: nothing to compare with
        echo(f"warning: {join(out, SETTINGS_FILE)} has no source fingerprint (an older repa-preprocess); "
             "resuming without checking that the source is unchanged")
        return
    lines = _source_changes(theirs["source"], mine["source"], read_json(join(out, SOURCE_FILE), storage_options),
                            listing)
    shown = "; ".join(lines[:6])
    raise PreprocessError(
        f"{mine['settings']['source']}: the source changed since {out} was started ({shown}). Its "
        f"{len(finished)} finished shards hold the records of the old listing (a record's key is the image's "
        "position in the listing), so resuming would mix two datasets. Restore the files and rerun the same "
        f"command, or write a new set with --out NEW (or delete {out} to start over)")


def write_settings(out: str, record: dict, listing: list | None, storage_options: dict | None) -> None:
    """Write preprocess.json (and the folder listing) unless they already hold exactly this."""
    if read_json(join(out, SETTINGS_FILE), storage_options) == record:
        return
    if listing is not None:
        write_json(join(out, SOURCE_FILE), {"listing": listing}, storage_options, compact=True)
    write_json(join(out, SETTINGS_FILE), record, storage_options)


# ---------------------------------------------------------------------------------------------- repair

def repair(out: str, done: dict, fields: dict, storage_options: dict | None, echo: Callable[[str], None],
           progress: bool = False, quick: bool = False) -> list[str]:
    """Verify the finished shards `done` ({name: ShardInfo}): fully (sha256, every record's headers and CRC)
    or, with `quick`, the O(1) identity check (size, first/last record headers, keys and CRCs); remove those
    that fail (the manifest that lists them first, then the sidecar, then the shard) so that this run
    rewrites them. Returns the names removed."""
    from tqdm.auto import tqdm
    codec = RecordCodec(fields)
    bad = []
    with tqdm(total=sum(i.nbytes for i in done.values()), unit="B", unit_scale=True,
              disable=not progress or quick, desc=f"verifying {len(done)} finished shards") as bar:
        for name in sorted(done):
            reason = verify_shard(join(out, name), done[name], codec, storage_options, quick=quick,
                                  progress=bar.update)
            if reason:
                bad.append(name)
                echo(f"{join(out, name)} failed verification ({reason}); rewriting it")
                storage.remove(join(out, MANIFEST), storage_options)
                storage.remove(join(out, name + ".json"), storage_options)
                storage.remove(join(out, name), storage_options)
    return bad


def bad_image_error(path: str, msg: str, out: str, storage_options: dict | None) -> PreprocessError:
    """The strict-mode error for an unreadable image, with advice that is true for this folder's state."""
    k = len(completed_shards(out, storage_options=storage_options))
    if not k:
        how = ("No shard is finished yet: fix or remove the file and rerun the same command, or rerun the same "
               "command with --skip-bad to skip it (listed in the manifest)")
    else:
        how = (f"Rerun the same command with --skip-bad: it keeps the {k} shards already finished, skips this "
               f"file and lists it in the manifest. Fixing or removing the file instead changes the source "
               f"listing those {k} shards were cut from: then write the set into a new --out (or delete {out})")
    return PreprocessError(f"cannot read image {path}: {msg}\n{how}")
