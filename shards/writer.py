"""Writing shard sets: one shard (ShardWriter), a planned set with roll-over (ShardSetWriter), resume
support (completed_shards) and the manifest (finalize_manifest).

Atomicity: a local shard is written to ``.<name>.repa-tmp-<pid>-<random>`` in its folder (storage.create_temp:
umask respected) and renamed when complete; on object stores the shard is staged in a local temp file named
``.repa-<set id>-<name>.repa-tmp-<pid>-<random>`` in $TMPDIR and uploaded at close (cleanup_stale_uploads
removes the staging files and unfinished multipart uploads that killed writers leave). Only then is the sidecar
``<name>.json`` (ShardInfo plus the key runs) written, atomically. A shard counts as done only if its
sidecar exists and the shard's size matches it, so an interrupted writer redoes exactly the shards that
are not done, without duplicates or gaps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings

from . import storage
from .codecs import encode_field
from .lock import pid_alive
from .manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo, write_manifest
from .schema import SCHEMA_VERSION, FieldSpec
from .tario import END_OF_ARCHIVE, RecordCodec

SIDECAR_SUFFIX = ".json"
TMP_MARK = ".tmp-"  # temp names of earlier repa versions (<shard>.tar.tmp-<pid>); removed by finalize_manifest
_LEGACY_TMP = re.compile(r"^[^/]+\.tar\.tmp-[0-9]+$")


def staging_prefix(out: str) -> str:
    """The prefix of this shard set's staging files in $TMPDIR (object-store output): ``repa-<set id>-``."""
    return "repa-" + hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:12] + "-"


def _key_runs(keys: list[int]) -> list[list[int]]:
    """[[start, stop), ...] runs of consecutive keys, in write order."""
    runs: list[list[int]] = []
    for k in keys:
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return runs


class ShardWriter:
    """Writes one shard of fixed-stride records; ``close()`` publishes it atomically and returns its ShardInfo."""

    def __init__(self, out: str, fields: dict[str, FieldSpec], *, shard_name: str,
                 storage_options: dict | None = None):
        if "/" in shard_name or not shard_name.endswith(".tar"):
            raise ValueError(f"shard_name {shard_name!r} must be a plain file name ending in .tar")
        self.out, self.name, self.fields = out, shard_name, dict(fields)
        self.url = storage.join(out, shard_name)
        self.storage_options = storage_options
        self.codec = RecordCodec(self.fields)
        storage.makedirs(out, storage_options)
        if storage.is_remote(out):
            self._f, self._tmp = storage.create_temp(tempfile.gettempdir(), staging_prefix(out) + shard_name)
        else:
            self._f, self._tmp = storage.create_temp(storage.local_path(out), shard_name)
        self._sha = hashlib.sha256()
        self._keys: list[int] = []
        self._seen: set[int] = set()
        self._nbytes = 0
        self._edge_crc = (0, 0)
        self.closed = False

    def write(self, key: int, sample: dict) -> None:
        """Append one record; ``key`` is the stable global index, ``sample`` maps every field to an array."""
        if self.closed:
            raise RuntimeError(f"{self.url}: write after close/abort")
        key = int(key)
        if key in self._seen:
            raise ValueError(f"{self.url}: key {key} written twice")
        missing = [f for f in self.fields if f not in sample]
        extra = [f for f in sample if f not in self.fields and f != "key"]
        if missing or extra:
            raise ValueError(f"{self.url}: record {key}: missing fields {missing}, unexpected fields {extra}; "
                             f"the schema has {list(self.fields)}")
        payloads = []
        for name, spec in self.fields.items():
            try:
                payloads.append(encode_field(sample[name], spec))
            except ValueError as e:
                raise ValueError(f"{self.url}: record {key}, field '{name}': {e}") from None
        rec = self.codec.pack(key, payloads)
        try:
            self._f.write(rec)
        except OSError as e:
            raise self._io_error(e) from e
        self._sha.update(rec)
        crc = int.from_bytes(rec[self.codec.crc_member.data_offset:][:4], "little")
        self._edge_crc = (self._edge_crc[0] if self._keys else crc, crc)
        self._nbytes += len(rec)
        self._keys.append(key)
        self._seen.add(key)

    @property
    def num_records(self) -> int:
        return len(self._keys)

    def close(self) -> ShardInfo:
        """Finish the tar, publish it under its final name, then write the sidecar; returns the ShardInfo."""
        if self.closed:
            raise RuntimeError(f"{self.url}: already closed")
        try:
            self._f.write(END_OF_ARCHIVE)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            self.abort()
            raise self._io_error(e) from e
        self._sha.update(END_OF_ARCHIVE)
        self._nbytes += len(END_OF_ARCHIVE)
        self._f.close()
        self.closed = True
        try:
            if storage.is_remote(self.url):
                storage.put_file(self._tmp, self.url, self.storage_options)
                os.unlink(self._tmp)
            else:
                storage.publish(self._tmp, self.url)
        except BaseException:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            raise
        info = ShardInfo(self.name, len(self._keys), self._nbytes, self._sha.hexdigest(),
                         self._keys[0] if self._keys else -1, self._keys[-1] if self._keys else -1,
                         self._edge_crc if self._keys else None)
        sidecar = dict(info.to_json(), key_runs=_key_runs(self._keys), schema_version=SCHEMA_VERSION,
                       record_bytes=self.codec.record_bytes)
        storage.write_bytes(self.url + SIDECAR_SUFFIX, json.dumps(sidecar).encode(), self.storage_options)
        return info

    def _io_error(self, e: OSError) -> OSError:
        return OSError(e.errno, f"{self.url}: writing the shard failed ({e.strerror or e}); it is not published "
                       f"(only its temporary file was written, removed on abort) and the shards already complete "
                       f"are intact. Free space and re-run: only unfinished shards are redone")

    def abort(self) -> None:
        """Drop the unfinished shard (removes the temp file); nothing is published."""
        if not self.closed:
            self._f.close()
            self.closed = True
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


class ShardSetWriter:
    """A planned shard set: shard j holds the global keys [j*R, (j+1)*R), named ``{prefix}-{j:06d}.tar``.

    R = records_per_shard, lowered so a shard stays under max_shard_bytes when given (records have a fixed
    size, so rolling over by size is also a fixed plan). Keys must arrive in increasing shard order; a shard is
    published as soon as all its keys are written, or when the next shard starts, or at close(). Keys of
    shards that are already complete on storage are skipped (``write`` returns False), which makes resuming
    an interrupted run safe: use ``pending(num_records)`` to know what is left to compute.
    """

    def __init__(self, out: str, fields: dict[str, FieldSpec], *, records_per_shard: int = 1000,
                 max_shard_bytes: int | None = None, prefix: str = "shard", storage_options: dict | None = None):
        self.out, self.fields, self.prefix = out, dict(fields), prefix
        self.storage_options = storage_options
        self.record_bytes = RecordCodec(self.fields).record_bytes
        rps = int(records_per_shard)
        if max_shard_bytes is not None:
            rps = min(rps, (int(max_shard_bytes) - len(END_OF_ARCHIVE)) // self.record_bytes)
        if rps < 1:
            raise ValueError(f"records_per_shard/max_shard_bytes allow less than one record "
                             f"({self.record_bytes} bytes) per shard")
        self.records_per_shard = rps
        self.done = completed_shards(out, storage_options)
        self.written: list[ShardInfo] = []
        self._cur: ShardWriter | None = None
        self._cur_j = -1

    def shard_index(self, key: int) -> int:
        return int(key) // self.records_per_shard

    def shard_name(self, j: int) -> str:
        return f"{self.prefix}-{j:06d}.tar"

    def pending(self, num_records: int) -> list[int]:
        """Keys in [0, num_records) whose shard is not complete yet."""
        r = self.records_per_shard
        return [k for j in range((num_records + r - 1) // r) if self.shard_name(j) not in self.done
                for k in range(j * r, min((j + 1) * r, num_records))]

    def write(self, key: int, sample: dict) -> bool:
        """Write one record into its planned shard; False if that shard is already complete (skipped)."""
        j = self.shard_index(key)
        name = self.shard_name(j)
        if name in self.done:
            return False
        if j != self._cur_j:
            if j < self._cur_j:
                raise ValueError(f"key {key} belongs to shard {name}, which this writer already passed; "
                                 "write keys in increasing shard order")
            self._finish()
            self._cur = ShardWriter(self.out, self.fields, shard_name=name, storage_options=self.storage_options)
            self._cur_j = j
        self._cur.write(key, sample)
        if self._cur.num_records == self.records_per_shard:
            self._finish()
        return True

    def _finish(self) -> None:
        if self._cur is not None and not self._cur.closed:
            info = self._cur.close()
            self.done[info.name] = info
            self.written.append(info)
        self._cur = None

    def close(self) -> list[ShardInfo]:
        """Publish the current shard; returns the shards written by this writer."""
        self._finish()
        return self.written

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()
            self._cur = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def _read_sidecars(out: str, storage_options: dict | None) -> dict[str, tuple[ShardInfo, list, int | None]]:
    names = storage.listdir(out, storage_options)
    present = set(names)
    result = {}
    for n in names:
        if not n.endswith(".tar" + SIDECAR_SUFFIX) or n == MANIFEST_NAME:
            continue
        shard = n[: -len(SIDECAR_SUFFIX)]
        url = storage.join(out, n)
        try:
            d = json.loads(storage.read_bytes(url, storage_options))
            info = ShardInfo.from_json(d)
            runs = [list(map(int, r)) for r in d.get("key_runs") or [[info.first_key, info.last_key + 1]]]
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{url}: unreadable sidecar ({e}); shard {shard} will be redone")
            continue
        if shard not in present:
            continue
        result[shard] = (info, runs, d.get("record_bytes"))
    return result


def completed_shards(out: str, storage_options: dict | None = None) -> dict[str, ShardInfo]:
    """Finished shards under ``out``: sidecar present and the shard's size equal to the sidecar's nbytes."""
    done = {}
    for shard, (info, _, _) in _read_sidecars(out, storage_options).items():
        if storage.size(storage.join(out, shard), storage_options) == info.nbytes:
            done[shard] = info
    return done


def _describe(keys: list[int], limit: int = 20) -> str:
    head = ", ".join(map(str, keys[:limit]))
    return head + (f", ... ({len(keys)} in total)" if len(keys) > limit else "")


def finalize_manifest(out: str, fields: dict[str, FieldSpec], provenance: dict, *,
                      expected_records: int | None = None, storage_options: dict | None = None) -> Manifest:
    """Collect the sidecars of the finished shards into ``out/manifest.json`` (shards sorted by name).

    Checks that every key appears once (and that the keys are exactly 0..expected_records-1 when given);
    raises ManifestError listing the duplicate/missing keys otherwise. Leftover local temp files of
    interrupted writers are removed (only names storage.is_own_temp matches, and earlier repa versions'
    ``<shard>.tar.tmp-<pid>``).
    """
    fields = dict(fields)
    rb = RecordCodec(fields).record_bytes
    side = _read_sidecars(out, storage_options)
    done = completed_shards(out, storage_options)
    shards, runs = [], []
    for name in sorted(done):
        info, key_runs, srb = side[name]
        if srb not in (None, rb) or info.nbytes != info.num_records * rb + len(END_OF_ARCHIVE):
            raise ManifestError(f"{storage.join(out, name)}: written with a different record layout "
                                f"({info.nbytes} bytes for {info.num_records} records of {rb}); remove it and "
                                "its .json sidecar and re-run the writer")
        shards.append(info)
        runs += [(a, b, name) for a, b in key_runs]
    runs.sort()
    dups, dup_shards, hi, prev = [], set(), 0, None
    for a, b, name in runs:
        if prev is not None and a < hi:
            dups += range(a, min(b, hi))
            dup_shards |= {name, prev}
        if b > hi:
            hi, prev = b, name
    if dups:
        raise ManifestError(f"{storage.join(out, MANIFEST_NAME)}: duplicate keys {_describe(dups)} in shards "
                            f"{sorted(dup_shards)}; remove the duplicated shards (and sidecars) and re-run")
    total = sum(s.num_records for s in shards)
    if expected_records is not None:
        missing, pos = [], 0
        for a, b, _ in runs:
            missing += range(pos, min(a, expected_records))
            pos = max(pos, b)
        missing += range(pos, expected_records)
        extra = [k for a, b, _ in runs for k in range(max(a, expected_records), b)]
        if missing or extra:
            raise ManifestError(f"{storage.join(out, MANIFEST_NAME)}: expected keys 0..{expected_records - 1}; "
                                f"missing {_describe(missing) or 'none'}; unexpected {_describe(extra) or 'none'}. "
                                "Re-run the writer: it redoes only the incomplete shards")
    if not storage.is_remote(out):
        for n in storage.listdir(out):
            if storage.is_own_temp(n) or _LEGACY_TMP.match(n):
                storage.remove(storage.join(out, n))
    manifest = Manifest(SCHEMA_VERSION, total, fields, shards, dict(provenance), rb)
    write_manifest(out, manifest, storage_options)
    return manifest


def cleanup_stale_uploads(out: str, storage_options: dict | None = None) -> dict[str, int]:
    """Remove what killed writers of the object-store shard set ``out`` left behind.

    * staging files of this set in $TMPDIR (``.repa-<set id>-<shard>.repa-tmp-<pid>-<random>``) whose writer
      process is gone (this host's pids: $TMPDIR is per host);
    * unfinished S3 multipart uploads under the set's prefix (a killed upload of a large shard keeps its
      parts, billed, until aborted).

    Call it once before the writers start (rank 0, under the output lock, before the other ranks pass the
    barrier): it aborts every unfinished upload under the prefix, a live writer's included. Returns
    {"temps_removed": n, "uploads_aborted": m}. Local shard sets: nothing to do (finalize_manifest removes
    temp files in the folder).
    """
    result = {"temps_removed": 0, "uploads_aborted": 0}
    if not storage.is_remote(out):
        return result
    tmpdir, mine = tempfile.gettempdir(), "." + staging_prefix(out)
    for n in os.listdir(tmpdir):
        t = storage.temp_target(n)
        if t is not None and n.startswith(mine) and not pid_alive(t[1]):
            try:
                os.unlink(os.path.join(tmpdir, n))
                result["temps_removed"] += 1
            except FileNotFoundError:
                pass
    if out.startswith(("s3://", "s3a://")):
        result["uploads_aborted"] = _abort_multipart_uploads(out, storage_options)
    return result


def _abort_multipart_uploads(out: str, storage_options: dict | None) -> int:
    fs, path = storage.filesystem(out, storage_options)
    bucket, _, prefix = path.rstrip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    n, marker = 0, {}
    while True:
        page = storage.retry(lambda: fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker),
                             out, "listing unfinished uploads of")
        for u in page.get("Uploads") or []:
            storage.retry(lambda: fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                                             UploadId=u["UploadId"]), f"s3://{bucket}/{u['Key']}",
                          "aborting the unfinished upload of")
            n += 1
        if not page.get("IsTruncated"):
            return n
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
