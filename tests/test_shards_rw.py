"""Writer -> reader round trips, manifest, tar compatibility, writer resume and finalize checks.

``write_set`` / ``sample_for`` are also used by the other test_shards_* files.
"""
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from repa.shards import (FieldSpec, ManifestError, ShardSetWriter, ShardStream, ShardWriter, completed_shards,
                    feature_spec, finalize_manifest, read_manifest)
from repa.shards import storage

FIELDS = {
    "moments": FieldSpec((4, 2, 2), "float32"),
    "label": FieldSpec((), "int64"),
    "feat.0": feature_spec((4, 8), "bf16"),
    "feat.1": feature_spec((4, 8), "int8"),
}
PROVENANCE = {"source": "synthetic", "resolution": 16, "latent_size": 2, "teachers": [{"field": "feat.0"}]}


def sample_for(key: int, fields=FIELDS) -> dict:
    """Deterministic record content for a key (so tests can recompute what a record must contain)."""
    g = torch.Generator().manual_seed(1000 + key)
    out = {}
    for name, spec in fields.items():
        if name == "label":
            out[name] = key % 7
        else:
            out[name] = torch.randn(spec.shape, generator=g) + key
    return out


def write_set(out, n, records_per_shard, fields=FIELDS, **kw):
    with ShardSetWriter(str(out), fields, records_per_shard=records_per_shard, **kw) as w:
        for k in range(n):
            w.write(k, sample_for(k, fields))
    return finalize_manifest(str(out), fields, PROVENANCE, expected_records=n, **{
        k: v for k, v in kw.items() if k == "storage_options"})


def expected_batch(keys, fields=FIELDS):
    """What the reader must return for these keys: the codec's own round trip of sample_for(key)."""
    from repa.shards import decode_field, encode_field
    return {f: torch.stack([decode_field(bytearray(encode_field(sample_for(int(k), fields)[f], spec)), spec)
                            for k in keys]) for f, spec in fields.items()}


def test_round_trip_every_field(tmp_path):
    m = write_set(tmp_path, 10, 4)
    assert m.num_records == 10 and [s.num_records for s in m.shards] == [4, 4, 2]
    assert [(s.first_key, s.last_key) for s in m.shards] == [(0, 3), (4, 7), (8, 9)]
    assert all(s.nbytes == s.num_records * m.record_bytes + 1024 for s in m.shards)
    assert m.record_bytes == 5 * (512 + 512)  # moments, label, feat.0, feat.1, crc: header + one data block each
    stream = ShardStream(str(tmp_path), 3, shuffle=False)
    batches = list(stream)
    assert [len(b["key"]) for b in batches] == [3, 3, 3, 1]
    keys = torch.cat([b["key"] for b in batches])
    assert keys.tolist() == list(range(10))
    exp = expected_batch(keys.tolist())
    for f in FIELDS:
        got = torch.cat([b[f] for b in batches])
        assert got.dtype == exp[f].dtype and torch.equal(got, exp[f]), f
    assert torch.equal(exp["label"], keys % 7)
    assert batches[0]["moments"].is_contiguous() and batches[0]["feat.0"].dtype == torch.bfloat16
    # fp32 moments are stored bit-exactly
    assert torch.equal(batches[0]["moments"][1], sample_for(1)["moments"])
    # field selection: label always comes along
    b = next(iter(ShardStream(str(tmp_path), 4, shuffle=False, fields=["feat.1"])))
    assert sorted(b) == ["feat.1", "key", "label"]


def test_manifest_and_tar_compatibility(tmp_path):
    write_set(tmp_path, 5, 5)
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d["schema_version"] == 1 and d["num_records"] == 5 and d["provenance"] == PROVENANCE
    assert list(d["fields"]) == list(FIELDS) and d["fields"]["feat.1"]["codec"] == "int8"
    import hashlib
    shard = tmp_path / "shard-000000.tar"
    assert d["shards"][0]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    names = tarfile.open(shard).getnames()
    assert names[:5] == ["0000000000.moments", "0000000000.label", "0000000000.feat.0", "0000000000.feat.1",
                         "0000000000.crc"] and len(names) == 25
    import webdataset as wds
    s = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    assert s["__key__"] == "0000000000" and {"moments", "feat.0", "feat.1", "label", "crc"} <= set(s)
    assert np.array_equal(np.frombuffer(s["moments"], np.float32).reshape(4, 2, 2), sample_for(0)["moments"].numpy())
    # incompatible schema version -> error naming the file
    d["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="manifest.json.*schema_version 99"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json.*invalid JSON"):
        read_manifest(str(tmp_path))


def test_rollover_by_size(tmp_path):
    rb = ShardSetWriter(str(tmp_path / "probe"), FIELDS).record_bytes
    m = write_set(tmp_path, 7, 1000, max_shard_bytes=3 * rb + 1024)
    assert [s.num_records for s in m.shards] == [3, 3, 1]
    assert all(os.path.getsize(tmp_path / s.name) <= 3 * rb + 1024 for s in m.shards)


def test_writer_resume_after_crash(tmp_path):
    out = str(tmp_path)
    w = ShardSetWriter(out, FIELDS, records_per_shard=3)
    for k in range(7):  # shards 0, 1 complete; shard 2 in progress when we "crash"
        w.write(k, sample_for(k))
    assert sorted(completed_shards(out)) == ["shard-000000.tar", "shard-000001.tar"]
    assert [n for n in os.listdir(out) if storage.is_own_temp(n)]  # the crash leaves a temp file
    # a shard whose size does not match its sidecar is not complete either
    with open(tmp_path / "shard-000001.tar", "ab") as f:
        f.write(b"x")
    w2 = ShardSetWriter(out, FIELDS, records_per_shard=3)
    assert sorted(w2.done) == ["shard-000000.tar"]
    assert w2.pending(8) == [3, 4, 5, 6, 7]
    for k in range(8):
        assert w2.write(k, sample_for(k)) == (k >= 3)
    w2.close()
    m = finalize_manifest(out, FIELDS, PROVENANCE, expected_records=8)
    assert [s.num_records for s in m.shards] == [3, 3, 2]
    assert not [n for n in os.listdir(out) if storage.is_own_temp(n) or ".tmp-" in n]
    keys = torch.cat([b["key"] for b in ShardStream(out, 8, shuffle=False)])
    assert keys.tolist() == list(range(8))


def test_finalize_reports_missing_and_duplicate_keys(tmp_path):
    out = str(tmp_path)
    for name, keys in [("a.tar", [0, 1, 2]), ("b.tar", [2, 3]), ("c.tar", [6])]:
        with ShardWriter(out, FIELDS, shard_name=name) as w:
            for k in keys:
                w.write(k, sample_for(k))
    with pytest.raises(ManifestError, match=r"duplicate keys 2 in shards \['a.tar', 'b.tar'\]"):
        finalize_manifest(out, FIELDS, {}, expected_records=7)
    os.unlink(tmp_path / "b.tar")
    with pytest.raises(ManifestError, match=r"missing 3, 4, 5"):
        finalize_manifest(out, FIELDS, {}, expected_records=7)
    m = finalize_manifest(out, FIELDS, {})  # no expectation: gaps are allowed (e.g. skipped images)
    assert m.num_records == 4


def test_writer_errors_name_the_record(tmp_path):
    w = ShardWriter(str(tmp_path), FIELDS, shard_name="s.tar")
    bad = sample_for(0)
    bad["moments"] = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"s.tar: record 0, field 'moments'.*shape"):
        w.write(0, bad)
    with pytest.raises(ValueError, match="missing fields \\['label'\\]"):
        w.write(1, {k: v for k, v in sample_for(1).items() if k != "label"})
    w.abort()
    assert os.listdir(tmp_path) == []


def test_every_written_file_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_set(tmp_path / "set", 7, 3)
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path / "set"))
    assert names == ["manifest.json"] + [f"shard-{j:06d}.tar{s}" for j in range(3) for s in ("", ".json")]
    assert {n: os.stat(tmp_path / "set" / n).st_mode & 0o777 for n in names} == {n: 0o644 for n in names}


def test_temp_names_and_cleanup_only_touch_own_pattern(tmp_path):
    name = storage.temp_name("shard-000001.tar")
    assert storage.is_own_temp(name) and storage.temp_target(name) == ("shard-000001.tar", os.getpid())
    for other in ("shard-000001.tar", "notes.repa-tmp-1-abcdef01", ".x.repa-tmp-12-ABCDEF01", ".x.repa-tmp--abcdef01",
                  ".x.repa-tmp-12-abcdef012", "my.tmp-file"):
        assert not storage.is_own_temp(other), other
    write_set(tmp_path, 4, 2)
    keep = ["notes.tmp-backup", ".hidden.repa-tmp-x", "shard-000000.tar.bak"]
    for n in keep + [name, "shard-000009.tar.tmp-4321"]:  # ours (new and earlier repa names) and the user's
        (tmp_path / n).write_bytes(b"x")
    finalize_manifest(str(tmp_path), FIELDS, PROVENANCE, expected_records=4)
    left = set(os.listdir(tmp_path))
    assert set(keep) <= left and name not in left and "shard-000009.tar.tmp-4321" not in left
