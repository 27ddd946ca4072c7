"""Files named like images that are not images on disk: FIFOs, sockets, stalled reads.

A FIFO named like an image used to hang repa-preprocess forever, even with --skip-bad (PIL's open waits for
data that never comes). Now: refused before any work (strict), or skipped and listed (--skip-bad); and every
file read gives up after REPA_READ_TIMEOUT seconds, naming the file. The runs are forked children with a
deadline, so a regression fails the test instead of hanging the suite."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from faults.conftest import run_forked
from repa.preprocess.cli import main
from repa.shards import ShardStream


def _args(data, out, *extra):
    return [f"imagefolder:{data}", "--res", "16", "--vae", "none", "--enc-type", "none", "--out", str(out),
            "--shard-size", "4", "--batch-size", "2", "--num-workers", "1", "--no-progress", *extra]


@pytest.fixture
def specials(tmp_path):
    """c0/{0,1,2}.png real; c0/pipe.png a FIFO held open by a writer that never writes; c1/sock.jpg a socket."""
    data = tmp_path / "data"
    for i in range(3):
        (data / "c0").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(data / "c0" / f"{i}.png")
    (data / "c1").mkdir()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(data / "c1" / "ok.png")
    os.mkfifo(data / "c0" / "pipe.png")
    writer = os.open(data / "c0" / "pipe.png", os.O_RDWR | os.O_NONBLOCK)  # a writer exists, never writes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(data / "c1" / "sock.jpg"))
    yield data
    os.close(writer)
    sock.close()


def _run_cli(argv, result: Path) -> int:
    """Run repa-preprocess in a forked child with a deadline; the ClickException message lands in `result`."""
    def target():
        try:
            s = main.main(argv, standalone_mode=False)
            result.write_text(json.dumps({"ok": True, "skipped": s["skipped"], "records": s["records"]}))
        except click.ClickException as e:
            result.write_text(json.dumps({"ok": False, "message": e.message}))
    return run_forked(target, timeout=60)


def test_special_files_strict_refused_before_work(specials, tmp_path, faults):
    out, res = tmp_path / "out", tmp_path / "result.json"
    t0 = time.monotonic()
    assert _run_cli(_args(specials, out), res) == 0
    r = json.loads(res.read_text())
    assert not r["ok"] and f"{specials / 'c0' / 'pipe.png'} is a named pipe (FIFO)" in r["message"]
    assert "1 more" in r["message"] and "--skip-bad" in r["message"]
    assert not out.exists()  # refused before the output folder was touched
    assert time.monotonic() - t0 < 30
    faults.record(faults=2, runs=1, records_lost=0, kind="special files (strict)")


def test_special_files_skipped_and_listed(specials, tmp_path, faults):
    out, res = tmp_path / "out", tmp_path / "result.json"
    assert _run_cli(_args(specials, out, "--skip-bad"), res) == 0
    r = json.loads(res.read_text())
    assert r == {"ok": True, "skipped": 2, "records": 4}
    stream = ShardStream(str(out), 64, shuffle=False)
    skipped = {Path(x["path"]).name: x for x in stream.manifest.provenance["skipped"]}
    assert set(skipped) == {"pipe.png", "sock.jpg"}
    # keys = positions in the sorted listing: c0/0 c0/1 c0/2 c0/pipe c1/ok c1/sock
    assert skipped["pipe.png"]["key"] == 3 and "named pipe (FIFO)" in skipped["pipe.png"]["error"]
    assert skipped["sock.jpg"]["key"] == 5 and "socket" in skipped["sock.jpg"]["error"]
    batch = next(iter(stream))
    got = dict(zip(map(int, batch["key"]), map(int, batch["label"])))
    assert got == {0: 0, 1: 0, 2: 0, 4: 1}
    faults.record(faults=2, runs=1, records_lost=0, kind="special files (--skip-bad)")


def test_stalled_read_times_out(tmp_path, faults):
    """A read that never completes (a FIFO with a silent writer stands in for a stalled network mount)."""
    from repa.preprocess.crop import ImageLimits
    from repa.preprocess.sources import SourceError, read_file
    fifo = tmp_path / "stalled.png"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        limits = ImageLimits(read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(SourceError) as e:
            read_file(str(fifo), limits, regular_only=False)
        took = time.monotonic() - t0
        assert 0.5 <= took < 3, took
        assert str(fifo) in str(e.value) and "REPA_READ_TIMEOUT" in str(e.value) and "0.5 s" in str(e.value)
        os.write(writer, b"late")  # the abandoned reader thread finishes once data and EOF come
    finally:
        os.close(writer)
    # a regular file reads normally, within the same limits; a FIFO is refused at once by default
    (tmp_path / "x.bin").write_bytes(b"\x01" * 100_000)
    assert read_file(str(tmp_path / "x.bin"), limits) == b"\x01" * 100_000
    with pytest.raises(SourceError, match="named pipe"):
        read_file(str(fifo), limits)
    with pytest.raises(ValueError, match="REPA_MAX_IMAGE_BYTES=1000 "):
        read_file(str(tmp_path / "x.bin"), ImageLimits(max_bytes=1000))
    faults.record(faults=1, runs=0, records_lost=0, kind="stalled read")


def test_read_timeout_from_env(monkeypatch):
    from repa.preprocess.crop import ImageLimits
    monkeypatch.setenv("REPA_READ_TIMEOUT", "2.5")
    assert ImageLimits.from_env().read_timeout == 2.5
    monkeypatch.setenv("REPA_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="REPA_READ_TIMEOUT='soon'"):
        ImageLimits.from_env()
