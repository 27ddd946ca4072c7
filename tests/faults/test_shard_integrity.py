"""Integrity checked on open (O(1) identity of every shard) and in full (repa-verify)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from repa.shards import ShardError, ShardSetWriter, ShardStream, finalize_manifest, read_manifest
from repa.shards.tario import RecordCodec
from repa.shards.verify import verify_set, verify_shard
from test_shards_rw import FIELDS, PROVENANCE, sample_for, write_set

N = 12  # 3 shards of 4


def write_other_set(out, n=N, rps=4):
    """Same layout, same keys and sizes, other contents: a set written from other images."""
    with ShardSetWriter(str(out), FIELDS, records_per_shard=rps) as w:
        for k in range(n):
            w.write(k, sample_for(k + 1000))
    return finalize_manifest(str(out), FIELDS, PROVENANCE, expected_records=n)


def keys_of(url, **kw):
    s = ShardStream(str(url), 5, shuffle=False, **kw)
    return [int(k) for b in s for k in b["key"]], s.skipped


def test_foreign_and_swapped_shards_refused_on_open(tmp_path, faults):
    a, b = tmp_path / "a", tmp_path / "b"
    write_set(a, N, 4)
    write_other_set(b)
    assert (a / "shard-000001.tar").stat().st_size == (b / "shard-000001.tar").stat().st_size
    shutil.copy(b / "shard-000001.tar", a / "shard-000001.tar")  # same size, same keys, other data
    with pytest.raises(ShardError, match=r"shard-000001\.tar: not the shard this manifest lists: its first record "
                                         r"\(key 4\) holds other data.*repa-verify.*repa-preprocess"):
        keys_of(a)
    keys, skipped = keys_of(a, skip_bad=True)
    assert keys == [0, 1, 2, 3, 8, 9, 10, 11] and skipped == 4

    c = tmp_path / "c"  # two shards of one set swapped: same sizes, keys in the wrong place
    write_set(c, N, 4)
    s0, s2 = (c / "shard-000000.tar").read_bytes(), (c / "shard-000002.tar").read_bytes()
    (c / "shard-000000.tar").write_bytes(s2)
    (c / "shard-000002.tar").write_bytes(s0)
    with pytest.raises(ShardError, match=r"shard-000000\.tar: .*first record has key 8, the manifest says 0"):
        keys_of(c)
    faults.record(faults=2, runs=1, kind="foreign/swapped shard")


def test_verify_set_and_cli_name_bad_shards(tmp_path, faults):
    d = tmp_path / "set"
    m = write_set(d, N, 4)
    assert verify_set(str(d), progress=False) == []
    rb = m.record_bytes
    p = d / "shard-000002.tar"  # a flipped byte in a middle record: the O(1) check on open cannot see it
    data = bytearray(p.read_bytes())
    data[rb + rb // 2] ^= 0x10
    p.write_bytes(bytes(data))
    (d / "shard-000000.tar").unlink()
    bad = verify_set(str(d), progress=False)
    assert [n for n, _ in bad] == ["shard-000000.tar", "shard-000002.tar"]
    assert bad[0][1] == "missing" and bad[1][1].startswith("record 1 (key 9): CRC-32 mismatch")
    assert verify_shard(str(d / "shard-000001.tar"), m.shards[1], m.fields) is None
    assert verify_shard(str(d / "shard-000002.tar"), m.shards[2], RecordCodec(m.fields), quick=True) is None
    assert verify_shard(str(d / "shard-000002.tar"), m.shards[2], m.fields).startswith("record 1 (key 9)")
    r = subprocess.run([sys.executable, "-m", "repa.shards.verify", str(d), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"BAD {d / 'shard-000000.tar'}: missing" in r.stderr
    assert f"BAD {d / 'shard-000002.tar'}: record 1 (key 9): CRC-32 mismatch" in r.stderr
    assert "rerun the same repa-preprocess command to rewrite them" in r.stderr
    good = tmp_path / "good"
    write_set(good, 5, 4)
    from click.testing import CliRunner
    from repa.shards.verify import main
    r = CliRunner().invoke(main, [str(good), "--no-progress"])
    assert r.exit_code == 0 and "all shards intact" in r.output, r.output
    faults.record(faults=2, runs=2, kind="verify: flipped byte / missing shard")


def test_manifest_records_edge_crcs_and_reads_old_manifests(tmp_path):
    import json
    d = tmp_path / "set"
    write_set(d, 6, 4)
    raw = json.loads((d / "manifest.json").read_text())
    assert all(len(s["edge_crc"]) == 2 for s in raw["shards"])
    for s in raw["shards"]:  # a set written before edge CRCs were recorded still opens (keys/headers checked)
        del s["edge_crc"]
    (d / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(str(d)).shards[0].edge_crc is None
    assert keys_of(d)[0] == list(range(6))
