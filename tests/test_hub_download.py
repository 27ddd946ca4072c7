"""repa.preprocess.hub: the one plain-URL download (hash-checked, atomic, umask), the cache folder, no import-time
side effects. Served by a real HTTP server on 127.0.0.1."""
import functools
import hashlib
import http.server
import os
import stat
import subprocess
import sys
import threading

import pytest

from repa.preprocess.hub import ModelDownloadError, cache_dir, download_file


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "w.bin").write_bytes(b"weights" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(b"weights" * 1000).hexdigest()
    httpd.shutdown()


def test_download_checks_the_hash_and_respects_the_umask(server, tmp_path):
    base, digest = server
    old = os.umask(0o022)
    try:
        out = download_file(f"{base}/w.bin", str(tmp_path / "c" / "w.bin"), sha256=digest, what="test weights")
    finally:
        os.umask(old)
    assert open(out, "rb").read() == b"weights" * 1000
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    with pytest.raises(ModelDownloadError, match="test weights.*w.bin"):
        download_file(f"{base}/w.bin", str(tmp_path / "d" / "w.bin"), hash_prefix="deadbeef", what="test weights")
    assert os.listdir(tmp_path / "d") == []  # no partial or unverified file left behind
    with pytest.raises(ModelDownloadError, match="put it at"):
        download_file("http://127.0.0.1:9/w.bin", str(tmp_path / "e" / "w.bin"))


def test_cache_dir_and_no_import_side_effects(monkeypatch, tmp_path):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path))
    assert cache_dir() == str(tmp_path)
    monkeypatch.delenv("REPA_CACHE")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "repa")
    code = ("import os; before = dict(os.environ); import repa.preprocess.hub; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "[]"
