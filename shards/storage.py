"""Storage access for shard sets: local paths or any fsspec URL (s3://, gs://, hf://, https://, ...).

Local paths use plain file I/O. Remote URLs go through fsspec with retries (exponential backoff on
connection errors, timeouts and 5xx answers, a limited number of attempts, then an error naming the URL).
This module is the one retry layer: for ``s3://`` the client's own retries are turned down to a single
attempt and its timeouts bounded (``S3_CONFIG_DEFAULTS``; config_kwargs given by the caller win), so a dead
endpoint fails after ``ATTEMPTS`` requests and a few seconds of backoff instead of minutes of nested retries.
For ``s3://`` the endpoint is taken from ``AWS_ENDPOINT_URL`` when the caller's storage options do not
name one, so a local MinIO/moto/Ceph endpoint works with the standard AWS environment variables.
"""
from __future__ import annotations

import os
import random
import re
import secrets
import time
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")
ATTEMPTS = 6
BASE_DELAY = 0.25  # sleeps 0.25, 0.5, 1, 2, 4 s (+ up to 25% jitter) between the attempts
# s3fs/botocore: one attempt per call (retry() above them retries), bounded connect/read (inactivity) timeouts
S3_CONFIG_DEFAULTS = {"connect_timeout": 10, "read_timeout": 60, "retries": {"total_max_attempts": 1}}
S3FS_RETRIES = 1  # s3fs's own retry loop (S3FileSystem.retries, a class attribute, default 5)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError)
_TRANSIENT_WORDS = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl",
                    " 500", " 502", " 503", " 504", "timed out", "Connection reset", "Connection refused",
                    "payload is not completed", "Disconnected", "IncompleteRead")


class StorageError(OSError):
    """A storage operation failed (after retries for transient errors); the message names the URL."""


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_remote(base) else os.path.join(local_path(base), name)


def _options(url: str, storage_options: dict | None) -> dict:
    opts = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith(("s3://", "s3a://")):
        if endpoint and "endpoint_url" not in opts:
            ck = dict(opts.get("client_kwargs") or {})
            ck.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = ck
        opts["config_kwargs"] = {**S3_CONFIG_DEFAULTS, **(opts.get("config_kwargs") or {})}
    return opts


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a remote URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **_options(url, storage_options))
    if url.startswith(("s3://", "s3a://")) and hasattr(fs, "retries"):
        fs.retries = S3FS_RETRIES  # retry() is the retry layer (see the module docstring)
    return fs, path


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts and server-side (5xx / throttling) errors are worth retrying."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any("Connection" in c.__name__ or "Timeout" in c.__name__ for c in type(exc).__mro__):
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    resp = getattr(exc, "response", None)
    if status is None and isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int):
        return status >= 500 or status == 429
    text = f" {exc}"
    if any(w in text for w in _TRANSIENT_WORDS):
        return True
    # s3fs turns a botocore ClientError (5xx, SlowDown) into a plain OSError whose __cause__ is the original
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient(cause)


_DENIED_WORDS = ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "InvalidClientTokenId", "Unauthorized")


def is_access_denied(exc: BaseException) -> bool:
    """Wrong or missing credentials (HTTP 401/403, S3 AccessDenied, ...): not worth retrying, say so."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        if isinstance(exc, PermissionError) or status in (401, 403) or any(w in str(exc) for w in _DENIED_WORDS):
            return True
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in _DENIED_WORDS:
            return True
        exc = exc.__cause__
    return False


def retry(fn: Callable[[], T], url: str, what: str, attempts: int | None = None,
          base_delay: float | None = None) -> T:
    """Run ``fn`` with exponential backoff on transient errors; raise StorageError naming ``url`` at the end.

    attempts/base_delay default to the module's ATTEMPTS/BASE_DELAY (read at call time)."""
    attempts = ATTEMPTS if attempts is None else attempts
    base_delay = BASE_DELAY if base_delay is None else base_delay
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified right below
            if is_access_denied(e):
                raise StorageError(f"{what} {url}: access denied ({type(e).__name__}: {e}). Check the credentials: "
                                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) or AWS_PROFILE "
                                   "in the environment, or key/secret/profile in the storage options, and that "
                                   "they may access this bucket/prefix") from e
            if not is_transient(e):
                raise
            if i == attempts - 1:
                raise StorageError(f"{what} {url} failed after {attempts} attempts ({type(e).__name__}: {e}); "
                                   "check the endpoint (AWS_ENDPOINT_URL), credentials and network") from e
            time.sleep(base_delay * 2**i * (1 + 0.25 * random.random()))
    raise AssertionError("unreachable")


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    if not is_remote(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url, storage_options)
    return retry(lambda: fs.cat_file(path), url, "reading")


# --- atomic local writes --------------------------------------------------------------------------------
# Every file repa's shard layer writes goes through a temp file named ``.<name>.repa-tmp-<pid>-<random>`` in
# the destination folder, fsynced, then renamed over the final name. The exact pattern is what cleanups match
# (is_own_temp), so they can never delete a user's file. Temp files are created with mode 0o666 and the
# process umask applied (0644 under umask 0022), never mkstemp's 0600.
TMP_TAG = ".repa-tmp-"
_OWN_TMP = re.compile(r"^\.(?P<name>.+)\.repa-tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def temp_name(name: str, pid: int | None = None) -> str:
    """The temp-file name for ``name`` (a base name): ``.<name>.repa-tmp-<pid>-<8 hex>``."""
    return f".{name}{TMP_TAG}{os.getpid() if pid is None else int(pid)}-{secrets.token_hex(4)}"


def is_own_temp(name: str) -> bool:
    """True only for names made by :func:`temp_name` (base name or path): what cleanups may delete."""
    return _OWN_TMP.match(os.path.basename(name)) is not None


def temp_target(name: str) -> tuple[str, int] | None:
    """(final base name, writer pid) of a temp name made by :func:`temp_name`, else None."""
    m = _OWN_TMP.match(os.path.basename(name))
    return (m["name"], int(m["pid"])) if m else None


def create_temp(directory: str, name: str):
    """Open a new temp file for ``name`` in ``directory`` (exclusive create, umask respected); (file, path)."""
    path = os.path.join(directory, temp_name(name))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    return os.fdopen(fd, "wb"), path


def publish(tmp: str, path: str) -> None:
    """Rename a finished (fsynced) temp file over ``path`` and fsync the folder so the rename is durable."""
    os.replace(tmp, path)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems (and NFS exports) refuse fsync on a directory; the rename itself is atomic
    finally:
        os.close(dfd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to the local ``path`` atomically: temp in the same folder + fsync + rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    f, tmp = create_temp(d, os.path.basename(path))
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Atomic write: :func:`atomic_write` locally; a single PUT (atomic) on object stores."""
    if is_remote(url):
        fs, path = filesystem(url, storage_options)
        retry(lambda: fs.pipe_file(path, data), url, "writing")
        return
    atomic_write(local_path(url), data)


def put_file(local: str, url: str, storage_options: dict | None = None) -> None:
    """Upload a finished local file to ``url`` in one put (object-store puts are atomic)."""
    fs, path = filesystem(url, storage_options)
    retry(lambda: fs.put_file(local, path), url, "uploading")


def makedirs(url: str, storage_options: dict | None = None) -> None:
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)


def listdir(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the entries directly under ``url`` ([] if it does not exist)."""
    if not is_remote(url):
        p = local_path(url)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # see what is there now (not every backend takes ls(refresh=True): HTTP does not)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), url, "listing")
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def size(url: str, storage_options: dict | None = None) -> int | None:
    """Size in bytes, or None if missing."""
    if not is_remote(url):
        try:
            return os.path.getsize(local_path(url))
        except FileNotFoundError:
            return None
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # instead of info(refresh=True), which HTTP forwards to aiohttp (a TypeError)
    try:
        n = retry(lambda: fs.info(path)["size"], url, "stat of")
    except FileNotFoundError:
        return None
    if n is None:
        raise StorageError(f"stat of {url}: the server gives no size (no Content-Length); serve the shard set "
                           "from a server that answers HEAD with Content-Length")
    return int(n)


def remove(url: str, storage_options: dict | None = None) -> None:
    if not is_remote(url):
        try:
            os.unlink(local_path(url))
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(url, storage_options)
    try:
        retry(lambda: fs.rm_file(path), url, "removing")
    except FileNotFoundError:
        pass


class RangeFile:
    """Random-access reads of one file into caller buffers (local: pread-style readinto; remote: range GETs)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.remote = is_remote(url)
        if self.remote:
            self._fs, self._path = filesystem(url, storage_options)
            self._f = None
        else:
            self._f = open(local_path(url), "rb", buffering=0)
        self._map = None  # lazily created memory map of a local file (see view())
        self.size = size(url, storage_options) if self.remote else os.fstat(self._f.fileno()).st_size

    def readinto(self, offset: int, out: np.ndarray) -> int:
        """Fill the uint8 array ``out`` from ``offset``; returns bytes read (less only at end of file)."""
        n = out.nbytes
        if self.remote:
            end = min(offset + n, self.size)
            if end <= offset:
                return 0
            try:
                data = retry(lambda: self._range(offset, end), self.url, "range read of")
            except FileNotFoundError:
                raise StorageError(f"{self.url}: gone during the run (NoSuchKey / 404): the shard set changed under "
                                   "the run. Run repa-verify on it and rerun the same repa-preprocess command "
                                   "(it rewrites missing shards), then restart") from None
            out.reshape(-1)[: len(data)] = np.frombuffer(data, np.uint8)
            return len(data)
        mv = memoryview(out.reshape(-1)).cast("B")
        got = 0
        while got < n:
            k = os.preadv(self._f.fileno(), [mv[got:]], offset + got) if hasattr(os, "preadv") else self._seek_read(offset + got, mv[got:])
            if k == 0:
                break
            got += k
        return got

    def _range(self, start: int, end: int) -> bytes:
        data = self._fs.cat_file(self._path, start=start, end=end)
        if len(data) > end - start:  # must not be retried: the server will do it again
            raise StorageError(f"range read of {self.url}: asked for bytes {start}-{end - 1} and got {len(data)} "
                               f"bytes: the server ignores HTTP Range requests (answers 200 with the whole file "
                               "instead of 206). Serve the shard set from a server that supports Range (nginx, "
                               "S3, GCS, python -m RangeHTTPServer, ...) or copy it to local disk")
        if len(data) < end - start:  # a cut-off answer: transient, retried
            raise ConnectionError(f"short range read: {len(data)} of {end - start} bytes (IncompleteRead)")
        return data

    def view(self, offset: int, nbytes: int) -> np.ndarray | None:
        """A zero-copy read-only uint8 view of ``[offset, offset + nbytes)`` of a local file (memory map), or
        None for remote files or ranges past the end (callers then fall back to :meth:`readinto`)."""
        if self.remote or offset + nbytes > self.size or nbytes == 0:
            return None
        if self._map is None:
            import mmap
            self._map = np.frombuffer(mmap.mmap(self._f.fileno(), self.size, access=mmap.ACCESS_READ), np.uint8)
        return self._map[offset:offset + nbytes]

    def _seek_read(self, offset: int, mv: memoryview) -> int:
        self._f.seek(offset)
        return self._f.readinto(mv)

    def close(self) -> None:
        self._map = None  # the map closes once no window view refers to it any more
        if self._f is not None:
            self._f.close()
            self._f = None
