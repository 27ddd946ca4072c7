"""Corrupt data: truncated tar, flipped byte, listed-but-missing shard, incompatible manifest version, tar member
with a path-traversal name, manifest naming a shard outside the set. Each is an error naming the shard (or the
manifest); skip_bad=True skips and counts."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from repa.shards import ManifestError, ShardError, ShardStream
from repa.shards.tario import ustar_header
from test_shards_rw import write_set

N = 24  # 4 shards of 6


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean") / "set"
    m = write_set(d, N, 6)
    return d, m


def copy(clean, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(clean[0], d)
    return d, clean[1]


def keys_of(url, **kw):
    s = ShardStream(str(url), 5, shuffle=False, **kw)
    return [int(k) for b in s for k in b["key"]], s.skipped


def test_truncated_shard(clean, tmp_path, faults):
    d, m = copy(clean, tmp_path, "trunc")
    rb = m.record_bytes
    os.truncate(d / "shard-000001.tar", 2 * rb + 100)  # records 2.. of shard 1 gone
    with pytest.raises(ShardError, match=r"shard-000001\.tar: .*truncated"):
        keys_of(d)
    keys, skipped = keys_of(d, skip_bad=True)
    assert skipped == 4 and keys == [k for k in range(N) if k not in range(8, 12)]
    faults.record(faults=1, kind="truncated tar", runs=1)


def test_flipped_byte_crc(clean, tmp_path, faults):
    d, m = copy(clean, tmp_path, "flip")
    p = d / "shard-000002.tar"
    data = bytearray(p.read_bytes())
    data[3 * m.record_bytes + 512 + 5] ^= 0x40  # a data byte of record 3 (key 15), first field
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.tar: record 3 \(key 15\): CRC-32 mismatch"):
        keys_of(d)
    keys, skipped = keys_of(d, skip_bad=True)
    assert skipped == 1 and keys == [k for k in range(N) if k != 15]
    faults.record(faults=1, kind="flipped byte", runs=1)


def test_listed_shard_missing(clean, tmp_path, faults):
    d, _ = copy(clean, tmp_path, "missing")
    os.remove(d / "shard-000003.tar")
    with pytest.raises(ShardError, match=r"shard-000003\.tar.*missing"):
        keys_of(d)
    keys, skipped = keys_of(d, skip_bad=True)
    assert skipped == 6 and keys == list(range(18))
    faults.record(faults=1, kind="missing shard", runs=1)


def test_incompatible_schema_version(clean, tmp_path, faults):
    d, _ = copy(clean, tmp_path, "version")
    man = json.loads((d / "manifest.json").read_text())
    man["schema_version"] = 2
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match=r"manifest\.json: schema_version 2 is not supported"):
        ShardStream(str(d), 4)
    faults.record(faults=1, kind="schema version")


def test_path_traversal_member_and_shard_name(clean, tmp_path, faults):
    d, m = copy(clean, tmp_path, "traversal")
    # a record whose first member is named ../../x (a valid ustar header, checksum included)
    p = d / "shard-000000.tar"
    data = bytearray(p.read_bytes())
    data[2 * m.record_bytes: 2 * m.record_bytes + 512] = ustar_header("../../x", m.fields["moments"].nbytes)
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: record 2 .*name/size/mode differ"):
        keys_of(d)
    keys, skipped = keys_of(d, skip_bad=True)
    assert skipped == 1 and 2 not in keys and len(keys) == N - 1
    # a manifest that points outside the shard set
    outside = tmp_path / "outside.tar"
    shutil.copy(clean[0] / "shard-000001.tar", outside)
    man = json.loads((d / "manifest.json").read_text())
    man["shards"][1]["name"] = "../outside.tar"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match=r"manifest\.json.*\.\./outside\.tar"):
        ShardStream(str(d), 4)
    faults.record(faults=2, kind="path traversal", runs=1)
