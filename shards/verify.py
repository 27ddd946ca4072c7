"""Shard integrity: the O(1) identity check done whenever a shard is opened, and the full verification.

* :func:`quick_check` (the reader runs it on every shard it opens): size against the manifest, the first and
  last records' tar headers, keys and stored CRC-32s (fixed stride: two record reads whatever the shard's
  size) and the end-of-archive blocks. It catches truncated, extended, swapped and foreign shards (a shard of
  the same size from another set) without reading the shard.
* :func:`verify_shard` / :func:`verify_set`: the whole bytes (sha256 against the manifest) and every record's
  headers and CRC-32. ``repa-verify SET`` is the command line; the preprocess rerun uses ``verify_shard`` to
  decide which shards to rewrite.
"""
from __future__ import annotations

import hashlib
import struct
import sys

import click
import numpy as np

from . import storage
from .manifest import Manifest, ManifestError, ShardInfo, read_manifest
from .tario import END_OF_ARCHIVE, RecordCodec

CHUNK_RECORDS = 64  # records per read of the full verification


def _stored_crc(codec: RecordCodec, record: np.ndarray) -> int:
    return struct.unpack_from("<I", record, codec.crc_member.data_offset)[0]


def _edge_problem(codec: RecordCodec, rec: np.ndarray, which: str, want_key: int, want_crc: int | None) -> str | None:
    keys, problems = codec.check_headers(rec.reshape(1, -1))
    if problems[0]:
        return f"its {which} record does not match the manifest's fields: {problems[0]}"
    if int(keys[0]) != want_key:
        return f"its {which} record has key {int(keys[0])}, the manifest says {want_key}"
    if want_crc is not None and _stored_crc(codec, rec) != want_crc:
        return (f"its {which} record (key {want_key}) holds other data than was written (stored CRC-32 "
                f"{_stored_crc(codec, rec):08x}, the manifest says {want_crc:08x})")
    return None


def quick_check(f: storage.RangeFile, info: ShardInfo, codec: RecordCodec) -> str | None:
    """None if the open shard ``f`` is the one the manifest describes (O(1) reads), else what differs."""
    if f.size != info.nbytes:
        return f"{f.size} bytes, the manifest says {info.nbytes}"
    rb, n = codec.record_bytes, info.num_records
    if info.nbytes != n * rb + len(END_OF_ARCHIVE):
        return f"the manifest's size {info.nbytes} does not fit {n} records of {rb} bytes"
    crcs = info.edge_crc or (None, None)
    if n:
        rec = np.empty(rb, np.uint8)
        if f.readinto(0, rec) != rb:
            return "its first record could not be read"
        p = _edge_problem(codec, rec, "first", info.first_key, crcs[0])
        if p:
            return p
    tail = np.empty(rb * (n > 0) + len(END_OF_ARCHIVE), np.uint8)
    if f.readinto(max(0, n - 1) * rb if n else 0, tail) != tail.size:
        return "its end could not be read"
    if n:
        p = _edge_problem(codec, tail[:rb], "last", info.last_key, crcs[1])
        if p:
            return p
    if tail[tail.size - len(END_OF_ARCHIVE):].any():
        return "it does not end with the tar end-of-archive blocks"
    return None


def verify_shard(url: str, info: ShardInfo, fields, storage_options: dict | None = None, *,
                 quick: bool = False, progress=None) -> str | None:
    """Verify one shard file: None if good, else the reason (missing, size, which record and why, sha256).

    ``url``: the shard's URL; ``info``: its ShardInfo (manifest entry or sidecar, e.g. from completed_shards);
    ``fields``: the set's fields (``manifest.fields``) or a RecordCodec of them. Reads the whole shard once
    (sha256, every header and CRC-32); ``quick=True`` only does the O(1) identity check the reader does on open.
    ``progress`` (optional) is called with the number of bytes read after each chunk.
    """
    codec = fields if isinstance(fields, RecordCodec) else RecordCodec(fields)
    try:
        f = storage.RangeFile(url, storage_options)
    except FileNotFoundError:
        return "missing"
    try:
        if f.size is None:
            return "missing"
        p = quick_check(f, info, codec)
        if p or quick:
            return p
        return _full_scan(f, info, codec, progress)
    finally:
        f.close()


def _full_scan(f: storage.RangeFile, info: ShardInfo, codec: RecordCodec, progress) -> str | None:
    rb, n = codec.record_bytes, info.num_records
    sha = hashlib.sha256()
    buf = np.empty((min(CHUNK_RECORDS, max(n, 1)), rb), np.uint8)
    for r0 in range(0, n, len(buf)):
        k = min(len(buf), n - r0)
        win = buf[:k]
        if f.readinto(r0 * rb, win) != k * rb:
            return f"record {r0}: could not be read"
        sha.update(win)
        keys, problems = codec.check_headers(win)
        for i in range(k):
            p = problems[i] or codec.check_crc(memoryview(win[i]))
            if p:
                return f"record {r0 + i} (key {int(keys[i])}): {p}"
        if progress:
            progress(k * rb)
    tail = np.empty(len(END_OF_ARCHIVE), np.uint8)
    f.readinto(n * rb, tail)
    sha.update(tail)
    if sha.hexdigest() != info.sha256:
        return f"sha256 {sha.hexdigest()[:16]}... differs from the manifest's {info.sha256[:16]}..."
    return None


def verify_set(url: str, storage_options: dict | None = None, progress: bool = True,
               manifest: Manifest | None = None) -> list[tuple[str, str]]:
    """Verify every shard of the set at ``url`` (sha256 + every record's headers and CRC-32).

    Returns [(shard name, reason), ...] for the bad shards, [] when the set is intact. ``progress`` shows a
    tqdm bar of the bytes read.
    """
    from tqdm import tqdm

    m = manifest or read_manifest(url, storage_options)
    codec = RecordCodec(m.fields)
    bad = []
    with tqdm(total=sum(s.nbytes for s in m.shards), unit="B", unit_scale=True, disable=not progress,
              desc="verifying", file=sys.stderr) as bar:
        for s in m.shards:
            why = verify_shard(storage.join(url, s.name), s, codec, storage_options, progress=bar.update)
            if why:
                bad.append((s.name, why))
    return bad


@click.command(name="repa-verify", help="Verify a repa shard set (directory or URL with manifest.json): every "
               "shard's sha256 and every record's tar headers and CRC-32. Exit 0 if intact, 1 naming each bad shard.")
@click.argument("shard_set")
@click.option("--progress/--no-progress", default=True, help="show a progress bar (stderr)")
def main(shard_set: str, progress: bool) -> None:
    try:
        bad = verify_set(shard_set, progress=progress)
    except (ManifestError, storage.StorageError) as e:
        raise click.ClickException(str(e)) from None
    if not bad:
        click.echo(f"{shard_set}: all shards intact")
        return
    for name, why in bad:
        click.echo(f"BAD {storage.join(shard_set, name)}: {why}", err=True)
    click.echo(f"{len(bad)} bad shard(s) in {shard_set}: rerun the same repa-preprocess command to rewrite them "
               "(it checks every shard and redoes the bad ones)", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
