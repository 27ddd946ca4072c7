"""Object storage: write a shard set to s3:// (moto_server on loopback) and stream it back."""
import pytest
import torch

from repa.shards import ShardStream, completed_shards, make_loader, read_manifest
from repa.shards import storage
from test_shards_rw import write_set


def test_s3_round_trip_equals_local(s3_bucket, tmp_path):
    url = f"{s3_bucket}/x"
    m_s3 = write_set(url, 23, 6)
    m_local = write_set(tmp_path, 23, 6)
    assert [s.sha256 for s in m_s3.shards] == [s.sha256 for s in m_local.shards]  # byte-identical shards
    assert read_manifest(url).to_json() == m_local.to_json()
    assert sorted(completed_shards(url)) == [f"shard-{j:06d}.tar" for j in range(4)]
    assert not [n for n in storage.listdir(url) if ".tmp-" in n]

    def batches(u, workers):
        return list(make_loader(ShardStream(u, 5, seed=4, shuffle_window=4), num_workers=workers))

    for workers in (0, 2):
        local, remote = batches(str(tmp_path), workers), batches(url, workers)
        assert len(remote) == len(local)
        for a, b in zip(remote, local):
            assert a.keys() == b.keys()
            for f in a:
                assert torch.equal(a[f], b[f]), f
    assert sorted(int(k) for b in local for k in b["key"]) == list(range(23))


def test_s3_missing_manifest_and_retry_names_url(s3_bucket):
    from repa.shards import ManifestError
    with pytest.raises(ManifestError, match=f"{s3_bucket}/nothing/manifest.json: not found"):
        read_manifest(f"{s3_bucket}/nothing")
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionError("Connection reset by peer")

    with pytest.raises(storage.StorageError, match=r"reading s3://b/k failed after 3 attempts"):
        storage.retry(flaky, "s3://b/k", "reading", attempts=3, base_delay=0.001)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # permanent errors are not retried
        storage.retry(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("x")), "s3://b/k", "reading")
    assert len(calls) == 1
