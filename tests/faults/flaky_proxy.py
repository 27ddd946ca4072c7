"""A loopback HTTP reverse proxy that injects object-store faults.

Sits between a client (s3fs/botocore) and ``moto_server`` on 127.0.0.1 and, following a
deterministic schedule, drops connections, answers 500/503, stalls, or truncates bodies.
Only loopback addresses are ever contacted.
"""
from __future__ import annotations

import http.client
import http.server
import socketserver
import threading
import time
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class FaultSchedule:
    """Decides the fate of each request: 'ok', 'drop', '500', '503', 'stall', 'truncate'.

    ``pattern`` is cycled over the sequence of requests; ``permanent`` makes every request fail
    with that action. Counts of injected faults are kept in ``injected``.
    """

    def __init__(self, pattern=("ok",), permanent: str | None = None, stall_seconds: float = 3.0):
        self.pattern = list(pattern)
        self.permanent = permanent
        self.stall_seconds = stall_seconds
        self.n = 0
        self.injected: dict[str, int] = {}
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            action = self.permanent or self.pattern[self.n % len(self.pattern)]
            self.n += 1
            if action != "ok":
                self.injected[action] = self.injected.get(action, 0) + 1
            return action


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # keep test output clean
        pass

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        action = self.server.schedule.next()
        if action == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if action in ("500", "503"):
            msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            if action == "503":
                msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(int(action))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body (bytes sent anyway would corrupt the next reply)
                self.wfile.write(msg)
            return
        if action == "stall":
            time.sleep(self.server.schedule.stall_seconds)
        up = urlsplit(self.server.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                self.send_header(k, v)
        # a HEAD answer has no body but announces the object's size: keep the upstream Content-Length
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if action == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
            return
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FlakyProxy:
    """``with FlakyProxy(upstream, schedule) as url:`` serves on an ephemeral loopback port."""

    def __init__(self, upstream: str, schedule: FaultSchedule):
        assert urlsplit(upstream).hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.upstream = upstream
        self.server.schedule = schedule
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
