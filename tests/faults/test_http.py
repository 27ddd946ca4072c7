"""http(s):// shard sets: read through fsspec's HTTP backend from a Range-capable server on 127.0.0.1, and a
clear error from a server that ignores Range (200 with the whole file instead of 206)."""
from __future__ import annotations

import functools
import http.server
import os
import re
import threading

import pytest
import torch

from repa.shards import ShardStream, StorageError, storage
from test_shards_rw import write_set


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range GETs (206 + Content-Range); ``ignore_range`` answers 200, whole file."""

    ignore_range = False

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            data = f.read()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and not self.ignore_range:
            a, b = int(m[1]), min(int(m[2] or len(data) - 1), len(data) - 1)
            body = data[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "none" if self.ignore_range else "bytes")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(ignore_range=False):
        handler = type("H", (RangeHandler,), {"ignore_range": ignore_range})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def batches(url):
    return list(ShardStream(url, 5, seed=2, shuffle_window=4))


def test_http_shard_set_reads_like_local(tmp_path, serve, faults):
    m = write_set(tmp_path / "set", 23, 6)
    base = serve() + "/set"
    assert storage.size(f"{base}/shard-000001.tar") == m.shards[1].nbytes  # no refresh= kwarg for aiohttp
    assert storage.size(f"{base}/shard-000009.tar") is None
    local, remote = batches(str(tmp_path / "set")), batches(base)
    assert len(local) == len(remote)
    for a, b in zip(local, remote):
        assert a.keys() == b.keys() and all(torch.equal(a[f], b[f]) for f in a)
    assert sorted(int(k) for b in remote for k in b["key"]) == list(range(23))
    faults.record(runs=1)


def test_server_ignoring_range_is_a_clear_error(tmp_path, serve, faults):
    write_set(tmp_path / "set", 8, 4)
    base = serve(ignore_range=True) + "/set"
    s = ShardStream(base, 4, shuffle=False)  # the manifest is read whole: fine
    with pytest.raises(StorageError, match=r"range read of http://127\.0\.0\.1:\d+/set/shard-00000\d\.tar: asked for "
                                           r"bytes \d+-\d+ and got \d+ bytes: the server ignores HTTP Range"):
        list(s)
    faults.record(faults=1, kind="HTTP server ignores Range")
