"""One writer per output folder: an exclusive lock that names its holder and survives crashes.

    from repa.shards.lock import OutputLock, LockHeld
    with OutputLock(out_dir, stage="repa-train") as lock:   # raises LockHeld if another run holds it
        if lock.previous: log.warning("took over the lock of a dead run: %s", lock.previous)
        ...

Local and NFS folders: ``fcntl.lockf`` on ``<folder>/.repa-lock``, held by an open file descriptor for the life
of the lock. The kernel (or the NFS lock manager) drops it when the holder exits or is SIGKILLed, so a dead
holder never blocks the next run; the file's JSON content (holder stage, user, host, pid, start time, command
line) is only information: it is what ``LockHeld`` reports, and what ``previous`` holds when the file still
names a holder that did not release (a crash). Limits: NFS needs working locking (NFSv4, or NFSv3 with lockd);
POSIX locks belong to the process, so this module refuses a second lock on the same file in the same process
(closing any descriptor of a locked file would silently drop the lock).

Object stores: a lease object ``<url>/.repa-lock`` created with a conditional put (S3 ``If-None-Match: *``)
and renewed by a heartbeat thread with ``If-Match: <etag>`` every ``ttl_s / 4`` seconds. A lease not renewed
for ``ttl_s`` seconds (its holder died, or lost the network), or naming a dead pid of this host, is stale and
is taken over with a conditional overwrite of exactly the stale version, so of two runs racing for a stale
lease one wins. Every write is read back and compared with this holder's token as well, which catches a
store that ignores the conditions. ``acquire(wait_s=...)`` waits for a live-looking lease to expire. Limits:
the age of a lease is judged by its holder's clock, so hosts need clocks within a few seconds (NTP); a
holder stalled for longer than ``ttl_s`` loses its lease (``lost`` becomes True and ``check()`` raises);
stores other than S3 (gs://, ...) have no conditional put through fsspec: there a lease is written, then read
back after ``SETTLE_S`` seconds, and the last writer wins, which is safe only when runs do not start within
``SETTLE_S`` of each other.
"""
from __future__ import annotations

import errno
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from . import storage

LOCK_NAME = ".repa-lock"
TTL_S = 120.0      # a lease not renewed for this long belongs to a dead run
SETTLE_S = 2.0     # stores without conditional puts: wait this long before reading a written lease back
_HELD: dict[str, "OutputLock"] = {}  # local lock files held by this process (POSIX locks are per process)
_HELD_GUARD = threading.Lock()


class LockHeld(RuntimeError):
    """Another run holds the output lock; the message names it and what to do."""


def _holder(stage: str, ttl_s: float) -> dict:
    now = time.time()
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    return {"stage": stage, "user": user, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_unix": now, "renewed_unix": now, "ttl_s": ttl_s,
            "cmd": " ".join(sys.argv), "token": uuid.uuid4().hex}


def _describe(path: str, info: dict | None, ttl_s: float) -> str:
    if not info:
        who = "an unknown run (the lock names no holder)"
    else:
        who = (f"{info.get('stage', '?')} run of user {info.get('user', '?')} on host {info.get('host', '?')} "
               f"pid {info.get('pid', '?')}, started {info.get('started', '?')}, command: {info.get('cmd', '?')}")
    return (f"output is locked by another run: {path} is held by {who}. Two runs writing one output folder "
            f"would corrupt it. Wait for that run to finish, or scancel/kill it; if that job is dead on another "
            f"host, its lock expires after {ttl_s:g} s (object stores) or is released by the kernel at once "
            f"(local/NFS folders), and the next start takes it over")


def _live_holder(fd: int, wait_s: float = 2.0) -> dict | None:
    """The holder named in a lock file we failed to lock. A winner that has just taken the lock may not have
    written its JSON yet (the file is empty, or still names the dead run before it), so read again for up to
    ``wait_s`` until it names a live process (or a process on another host, which we cannot check)."""
    deadline = time.monotonic() + wait_s
    while True:
        held = _parse(os.pread(fd, 1 << 16, 0))
        mine = held and held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int)
        if (held and not mine) or (mine and pid_alive(held["pid"])) or time.monotonic() >= deadline:
            return held
        time.sleep(0.02)


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data.decode())
        return info if isinstance(info, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None


class OutputLock:
    """Exclusive lock of the output folder ``url`` (local path or s3://...). See the module docstring."""

    def __init__(self, url: str, stage: str = "repa", storage_options: dict | None = None, ttl_s: float = TTL_S):
        self.url, self.stage, self.ttl_s = str(url), stage, float(ttl_s)
        self.storage_options = storage_options
        self.path = storage.join(self.url, LOCK_NAME)
        self.previous: dict | None = None
        self.lost = False
        self.info: dict | None = None
        self._fd: int | None = None
        self._lease: _Lease | None = None

    def acquire(self, wait_s: float = 0.0) -> "OutputLock":
        """Take the lock or raise LockHeld. ``wait_s`` > 0 retries for that long first (e.g. ``ttl_s`` for a
        requeued job whose killed predecessor's lease has not expired yet)."""
        if self.info is not None:
            return self
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire_once()
            except LockHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(5.0, self.ttl_s / 4, max(0.05, deadline - time.monotonic())))

    def _acquire_once(self) -> "OutputLock":
        info = _holder(self.stage, self.ttl_s)
        if storage.is_remote(self.url):
            lease = _Lease(self.path, self.storage_options, self.ttl_s)
            self.previous = lease.acquire(info)
            self._lease = lease
        else:
            self._acquire_local(info)
        self.info = info
        return self

    def _acquire_local(self, info: dict) -> None:
        import fcntl

        path = os.path.abspath(storage.local_path(self.path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _HELD_GUARD:
            if path in _HELD:
                raise LockHeld(_describe(path, _HELD[path].info, self.ttl_s))
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # open() applies the umask (0644 under 0022)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                held = _live_holder(fd)
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise LockHeld(_describe(path, held, self.ttl_s)) from None
                raise
            self.previous = _parse(os.pread(fd, 1 << 16, 0))  # a holder that never released: it crashed
            data = json.dumps(info, indent=1).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd = fd
            _HELD[path] = self

    def check(self) -> None:
        """Raise LockHeld if the lease was lost (this run stalled past the TTL and another run took over)."""
        if self.lost or (self._lease is not None and self._lease.lost):
            self.lost = True
            raise LockHeld(f"lost the output lock {self.path}: this run did not renew it for {self.ttl_s:g} s "
                           "and another run took it over; stop this run (its outputs may be overwritten)")

    def release(self) -> None:
        """Release the lock (idempotent). A clean release empties the lock so the next run reports no previous."""
        if self._fd is not None:
            path = os.path.abspath(storage.local_path(self.path))
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing drops the lockf lock
                self._fd = None
                with _HELD_GUARD:
                    _HELD.pop(path, None)
        if self._lease is not None:
            self._lease.release()
            self.lost = self.lost or self._lease.lost
            self._lease = None
        self.info = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _Lease:
    """An object-store lease: conditional create / take-over, heartbeat renewal, token-checked release."""

    def __init__(self, url: str, storage_options: dict | None, ttl_s: float):
        self.url, self.ttl_s = url, ttl_s
        self.store = _S3Store(url, storage_options) if url.startswith(("s3://", "s3a://")) \
            else _PlainStore(url, storage_options)
        self.etag: str | None = None
        self.info: dict | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, info: dict) -> dict | None:
        """Take the lease; returns the stale holder's info when a dead run's lease was taken over."""
        data = json.dumps(info, indent=1).encode()
        for _ in range(5):  # the lease can vanish/change between our reads: a few bounded rounds
            previous = None
            if self.store.create(data):
                self.etag = self.store.confirm(info["token"])
            else:
                got = self.store.get()
                if got is None:
                    continue  # released between our create and get: try creating again
                old, etag = _parse(got[0]), got[1]
                if (old or {}).get("token") == info["token"]:  # our create landed, its answer was lost
                    self.etag = etag
                elif not self._stale(old):
                    raise LockHeld(_describe(self.url, old, self.ttl_s))
                elif not self.store.replace(data, etag):
                    continue  # another run took the stale lease first: look again
                else:
                    self.etag, previous = self.store.confirm(info["token"]), old or {}
            if self.etag is None:
                got = self.store.get()
                raise LockHeld(_describe(self.url, _parse(got[0]) if got else None, self.ttl_s))
            self.info = info
            self._thread = threading.Thread(target=self._heartbeat, name="repa-lock-heartbeat", daemon=True)
            self._thread.start()
            return previous
        raise LockHeld(f"could not take the output lock {self.url}: it changed hands 5 times while trying; "
                       "another run is starting at the same moment, retry in a minute")

    def _stale(self, old: dict | None) -> bool:
        if not old:
            return True  # unreadable lease (a torn write of a store without atomic puts): nobody holds it
        if old.get("host") == socket.gethostname() and isinstance(old.get("pid"), int) and not pid_alive(old["pid"]):
            return True  # its holder ran on this host and is gone: no need to wait for the TTL
        ttl = float(old.get("ttl_s", self.ttl_s))
        return time.time() - float(old.get("renewed_unix", 0)) > ttl

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.info["renewed_unix"] = time.time()
            try:
                ok = self.store.replace(json.dumps(self.info, indent=1).encode(), self.etag)
                etag = self.store.confirm(self.info["token"]) if ok else None
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried next beat; the TTL is 4 beats
                print(f"repa: renewing the output lock {self.url} failed ({type(e).__name__}: {e}); "
                      "retrying", file=sys.stderr)
                continue
            if etag is None:
                self.lost = True
                print(f"repa: LOST the output lock {self.url}: another run took it over", file=sys.stderr)
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.info is None or self.lost:
            return
        got = self.store.get()
        if got is not None and (_parse(got[0]) or {}).get("token") == self.info["token"]:
            self.store.delete()
        self.info = None


class _S3Store:
    """S3 conditional puts (If-None-Match / If-Match), supported by AWS S3 since 2024, MinIO and moto."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url = url
        self.fs, path = storage.filesystem(url, storage_options)
        self.bucket, self.key = path.split("/", 1)

    def _put(self, data: bytes, **cond) -> bool:
        try:
            storage.retry(lambda: self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                                  **cond), self.url, "writing the lock")
            return True
        except (FileExistsError, FileNotFoundError):
            return False  # If-None-Match: it exists / If-Match: it was deleted
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, etag: str | None) -> bool:
        return self._put(data, IfMatch=etag) if etag else False

    def get(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get_once():  # body and ETag from one GET, so they belong to the same version
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with r["Body"] as body:
                return await body.read(), r["ETag"]

        def fetch():
            return sync(self.fs.loop, get_once)
        try:
            return storage.retry(fetch, self.url, "reading the lock")
        except FileNotFoundError:
            return None

    def confirm(self, token: str) -> str | None:
        """The ETag of the lease if it now holds ``token`` (a read-back: guards against ignored conditions)."""
        got = self.get()
        return got[1] if got is not None and (_parse(got[0]) or {}).get("token") == token else None

    def delete(self) -> None:
        storage.remove(self.url)


class _PlainStore:
    """Stores without conditional puts: write, wait SETTLE_S, read back; the last writer wins (see module doc)."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url, self.opts = url, storage_options

    def create(self, data: bytes) -> bool:
        if storage.size(self.url, self.opts) is not None:
            return False
        storage.write_bytes(self.url, data, self.opts)
        return True

    def replace(self, data: bytes, etag: str | None) -> bool:
        got = self.get()
        if got is None or got[1] != etag:
            return False
        storage.write_bytes(self.url, data, self.opts)
        return True

    def get(self) -> tuple[bytes, str] | None:
        try:
            data = storage.read_bytes(self.url, self.opts)
        except FileNotFoundError:
            return None
        import hashlib
        return data, hashlib.sha256(data).hexdigest()

    def confirm(self, token: str) -> str | None:
        time.sleep(SETTLE_S)
        got = self.get()
        return got[1] if got is not None and (_parse(got[0]) or {}).get("token") == token else None

    def delete(self) -> None:
        storage.remove(self.url, self.opts)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return True


def _precondition_failed(e: BaseException) -> bool:
    for x in (e, e.__cause__, e.__context__):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                            "ConditionalRequestConflict"):
            return True
    return "Precondition" in str(e) or "412" in str(e)
