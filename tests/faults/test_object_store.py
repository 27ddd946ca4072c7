"""Flaky object store: FlakyProxy (drops, 500, 503, stalls, truncated bodies) between s3fs and moto_server.

Shards are written and streamed through the proxy; the records and their order equal a local copy's. A
permanently failing endpoint ends with a StorageError naming the URL after storage.ATTEMPTS requests.
The backoff base is shortened for the test (the schedule, not its length, is what is tested).
"""
from __future__ import annotations

import os
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


# ---------------------------------------------------------------- credentials, vanished shards, leftovers

@pytest.fixture(scope="module")
def auth_endpoint():
    """A second moto_server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are refused."""
    import shutil
    import socket
    import subprocess
    import sys
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto_server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_credentials_name_url_and_fix(auth_endpoint, faults):
    so = {"key": "AKIAWRONGWRONGWRONG0", "secret": "wrong", "client_kwargs": {"endpoint_url": auth_endpoint}}
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"reading s3://bucket/set/manifest\.json: access denied .*"
                                           r"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.*AWS_PROFILE"):
        ShardStream("s3://bucket/set", 4, storage_options=so)
    assert time.perf_counter() - t0 < 5  # refused at once, not retried
    with pytest.raises(StorageError, match=r"writing s3://bucket/set/x\.json: access denied"):
        storage.write_bytes("s3://bucket/set/x.json", b"{}", so)
    faults.record(faults=2, kind="wrong credentials")


def test_shard_deleted_mid_run_names_it_and_the_fix(s3_bucket, faults):
    from repa.shards import ShardError
    url = f"{s3_bucket}/set"
    write_set(url, 12, 4)
    it = iter(ShardStream(url, 2, shuffle=False, shuffle_window=2))
    assert next(it)["key"].tolist() == [0, 1]
    storage.remove(f"{url}/shard-000001.tar")  # not opened yet: found missing when the stream gets there
    with pytest.raises(ShardError, match=r"shard-000001\.tar: listed in the manifest \(4 records\) but missing "
                                         r"\(deleted, or the shard set changed under the run\); run repa-verify"):
        list(it)
    it = iter(ShardStream(url, 2, shuffle=False, shuffle_window=2))
    assert next(it)["key"].tolist() == [0, 1]
    storage.remove(f"{url}/shard-000000.tar")  # already open: its next range read finds NoSuchKey
    with pytest.raises(StorageError, match=r"shard-000000\.tar: gone during the run \(NoSuchKey / 404\): the shard "
                                           r"set changed under the run\. Run repa-verify"):
        next(it)
    faults.record(faults=2, kind="shard deleted mid-run")


def test_killed_s3_write_leftovers_cleaned_up(s3_bucket, tmp_path, monkeypatch, faults):
    import tempfile

    from faults.conftest import run_forked, sigkill_self
    from repa.shards import ShardWriter, cleanup_stale_uploads
    from repa.shards.writer import staging_prefix
    from test_shards_rw import FIELDS, sample_for
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    url = f"{s3_bucket}/set"
    fs, path = storage.filesystem(url)
    bucket = path.split("/", 1)[0]

    def killed_writer():  # a shard staged in $TMPDIR and a multipart upload of it under way, then SIGKILL
        w = ShardWriter(url, FIELDS, shard_name="shard-000000.tar")
        for k in range(3):
            w.write(k, sample_for(k))
        fs, _ = storage.filesystem(url)  # this process's own client (s3fs clients are not fork-safe)
        up = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="set/shard-000000.tar")
        fs.call_s3("upload_part", Bucket=bucket, Key="set/shard-000000.tar", UploadId=up["UploadId"], PartNumber=1,
                   Body=b"\0" * (5 << 20))
        sigkill_self()

    assert run_forked(killed_writer) == -9
    leaked = [n for n in os.listdir(tmp) if storage.is_own_temp(n)]
    assert len(leaked) == 1 and leaked[0].startswith("." + staging_prefix(url) + "shard-000000.tar")
    keep = [storage.temp_name(staging_prefix(url) + "shard-000001.tar"),  # this process's: a live writer
            ".repa-0123456789ab-shard-000000.tar.repa-tmp-999999-abcdef01",  # another set's
            "user-notes.txt"]
    for n in keep:
        (tmp / n).write_bytes(b"x")
    other = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="other/shard-000000.tar")

    def uploads(prefix):
        return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])]

    assert uploads("set/") == ["set/shard-000000.tar"]
    assert cleanup_stale_uploads(url) == {"temps_removed": 1, "uploads_aborted": 1}
    assert uploads("set/") == [] and uploads("other/") == ["other/shard-000000.tar"]
    assert sorted(os.listdir(tmp)) == sorted(keep)
    assert cleanup_stale_uploads(url) == {"temps_removed": 0, "uploads_aborted": 0}
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key="other/shard-000000.tar", UploadId=other["UploadId"])
    faults.record(faults=1, runs=1, kind="SIGKILL during an S3 shard upload")
