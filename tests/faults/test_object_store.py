"""Flaky object store: FlakyProxy (drops, 500, 503, stalls, truncated bodies) between s3fs and moto_server.

Shards are written and streamed through the proxy; the records and their order equal a local copy's. A
permanently failing endpoint ends with a StorageError naming the URL after storage.ATTEMPTS requests.
The backoff base is shortened for the test (the schedule, not its length, is what is tested).
"""
from __future__ import annotations

import time

import pytest
import torch

from faults.flaky_proxy import FaultSchedule, FlakyProxy
from repa.shards import ShardStream, StorageError, storage
from test_shards_rw import write_set

PATTERN = ["ok"] * 3 + ["503"] + ["ok"] * 3 + ["drop"] + ["ok"] * 3 + ["500"] + ["ok"] * 3 + ["truncate"] + \
    ["ok"] * 3 + ["stall"]
# botocore's read timeout turns a stall into a retryable ReadTimeoutError
FAST = {"config_kwargs": {"read_timeout": 0.5, "connect_timeout": 2}}


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BASE_DELAY", 0.01)


def stream(url, **kw):
    return [b for b in ShardStream(url, 5, seed=3, shuffle_window=4, storage_options=kw.pop("so", None), **kw)]


def test_flaky_store_same_records(s3_endpoint, s3_bucket, tmp_path, monkeypatch, fast_backoff, faults):
    local = write_set(tmp_path / "local", 23, 6)
    want = stream(str(tmp_path / "local"))
    sched = FaultSchedule(PATTERN, stall_seconds=1.0)
    with FlakyProxy(s3_endpoint, sched) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        url = f"{s3_bucket}/set"
        m = write_set(url, 23, 6, storage_options=FAST)
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in local.shards]
        written = dict(sched.injected)
        got = stream(url, so=FAST)
    assert sum(written.values()) >= 3, written
    assert len(got) == len(want)
    for a, b in zip(got, want):  # same records in the same order, bit for bit
        assert a.keys() == b.keys()
        for f in a:
            assert torch.equal(a[f], b[f]), f
    n = sum(sched.injected.values())
    assert set(sched.injected) == {"503", "drop", "500", "truncate", "stall"}, sched.injected
    faults.record(faults=n, kind="object store", runs=2, records_lost=23 - len({int(k) for b in got for k in b["key"]}))
    print(f"flaky store: {sched.n} requests, injected {sched.injected}")


@pytest.mark.parametrize("action", ["503", "drop"])
def test_dead_store_fails_fast_naming_url(s3_endpoint, s3_bucket, monkeypatch, fast_backoff, faults, action):
    url = f"{s3_bucket}/set"
    write_set(url, 8, 4)
    s = ShardStream(url, 4, shuffle=False)  # manifest read while the store is up
    sched = FaultSchedule(permanent=action)
    with FlakyProxy(s3_endpoint, sched) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        t0 = time.perf_counter()
        with pytest.raises(StorageError, match=rf"reading {s3_bucket}/set/manifest\.json failed after "
                                               rf"{storage.ATTEMPTS} attempts"):
            ShardStream(url, 4)
        n_manifest = sched.n
        elapsed = time.perf_counter() - t0
        with pytest.raises(StorageError, match=rf"{s3_bucket}/set/shard-00000\d\.tar failed after"):
            list(s)
    # no nested client retries: one request per attempt (aiobotocore may resend once on a dropped connection)
    assert storage.ATTEMPTS <= n_manifest <= 2 * storage.ATTEMPTS, n_manifest
    assert elapsed < 5, elapsed
    faults.record(faults=sched.n, kind=f"permanent {action}")
