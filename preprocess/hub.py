"""Fail-fast model downloads: turn hub/timm/torch.hub errors into one clear message.

Every frozen model that repa loads (SD-VAE, teachers) goes through :func:`download_guard`. When a
download cannot happen (no network, gated repository, missing token, file not in the offline cache), the
libraries raise a zoo of exception types, sometimes only after long retries. The guard recognises them and
raises :class:`ModelDownloadError`, whose message names the model and the ways out:

* ``huggingface-cli login`` (gated or private repositories),
* ``HF_HUB_OFFLINE=1`` with a filled cache (machines without network),
* a local path (``--vae /path/to/diffusers_dir``, ``--enc-type timm:local-dir:/path``).

Inside the guard the Hugging Face hub's network timeouts are shortened (unless the user set them), so an
unreachable hub fails in seconds rather than minutes; importing this module changes nothing process-wide.

Also here, for every stage: :func:`cache_dir` (``$REPA_CACHE`` or ``~/.cache/repa``) and
:func:`download_file`, the one plain-URL download (atomic, hash-checked, umask-respecting).
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import urllib.error
import urllib.parse

__all__ = ["ModelDownloadError", "download_guard", "is_offline", "is_download_error", "fixes_text", "unreachable",
           "cache_dir", "download_file"]

# seconds; used inside download_guard unless HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT are set
_HUB_TIMEOUTS = {"HF_HUB_ETAG_TIMEOUT": 5, "HF_HUB_DOWNLOAD_TIMEOUT": 10}


def cache_dir() -> str:
    """Where repa keeps downloaded and built models: ``$REPA_CACHE``, else ``~/.cache/repa``."""
    return os.environ.get("REPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repa")


class ModelDownloadError(RuntimeError):
    """A frozen model's weights could not be obtained (network, gated repo, token, offline cache)."""


def is_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def fixes_text(local_hint: str) -> str:
    """The ways out, as a bullet list (``local_hint`` says how to point repa at a local copy)."""
    return (
        "Ways out:\n"
        "  - gated or private repository: accept its licence on huggingface.co and run `huggingface-cli login` (`hf auth login`)"
        " (or set HF_TOKEN);\n"
        "  - no network on this machine: download once elsewhere into the cache (HF_HOME / TORCH_HOME), copy"
        " the cache here and run with HF_HUB_OFFLINE=1;\n"
        f"  - or use a local copy: {local_hint}."
    )


_MESSAGE_MARKERS = (
    "couldn't connect", "could not connect", "connection", "offline", "cannot find the requested files",
    "not a valid model identifier", "gated", "401", "403", "404", "repository not found",
    "entry not found", "local_files_only", "name or service not known", "temporary failure in name resolution",
    "timed out", "max retries exceeded", "unauthorized", "does not appear to have a file named",
    "hf_hub_offline",
)


def _hub_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [urllib.error.URLError, socket.timeout, socket.gaierror,
                                        ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors
        for name in ("LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError",
                     "EntryNotFoundError", "RevisionNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled"):
            t = getattr(hf_errors, name, None)
            if isinstance(t, type):
                types.append(t)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of timm/diffusers
        pass
    try:
        import requests
        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx
        types += [httpx.TransportError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_download_error(err: BaseException) -> bool:
    """Whether ``err`` (or its cause chain) looks like a failed download rather than a bug or bad config."""
    types = _hub_error_types()
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if isinstance(e, types):
            return True
        if isinstance(e, (OSError, RuntimeError, ValueError)):
            msg = str(e).lower()
            if any(m in msg for m in _MESSAGE_MARKERS):
                return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=None)
def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """None if a TCP connection to ``url``'s host can be opened within ``timeout`` s, else the reason.

    Used before hub downloads: without it huggingface_hub retries a dead endpoint with backoff for
    about 25 s per file. Behind a proxy (``HTTPS_PROXY`` ...) the probe is skipped (returns None).
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as err:
        return f"cannot reach {parts.scheme}://{host}:{port} ({err})"


@contextlib.contextmanager
def _short_hub_timeouts():
    """huggingface_hub reads these constants at call time: shorten them for the block, then restore."""
    from huggingface_hub import constants
    before = {k: getattr(constants, k) for k in _HUB_TIMEOUTS}
    for k, v in _HUB_TIMEOUTS.items():
        if not os.environ.get(k):
            setattr(constants, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(constants, k, v)


@contextlib.contextmanager
def _offline_hub():
    """Run the block with huggingface_hub in offline mode (cache only, no network, no retries)."""
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def download_guard(model: str, local_hint: str, hub: bool = True):
    """Re-raise download failures inside the block as :class:`ModelDownloadError` naming ``model``.

    With ``hub=True`` (Hugging Face downloads) and no offline mode, the hub endpoint is probed first;
    when it cannot be reached the block runs in offline mode, so a cached copy still loads and a missing
    one fails at once instead of after minutes of retries.
    """
    dead = None
    if hub and not is_offline():
        from huggingface_hub import constants
        dead = unreachable(constants.ENDPOINT)
    try:
        with (_offline_hub() if dead else contextlib.nullcontext()), _short_hub_timeouts():
            yield
    except ModelDownloadError:
        raise
    except Exception as err:  # noqa: BLE001 - filtered by is_download_error, everything else re-raised
        if not is_download_error(err):
            raise
        if is_offline():
            mode = "HF_HUB_OFFLINE=1 is set and the files are not in the local cache"
        elif dead:
            mode = f"the Hugging Face hub is unreachable: {dead}; the files are not in the local cache"
        else:
            mode = "the download failed"
        raise ModelDownloadError(
            f"Could not load model '{model}': {mode} ({type(err).__name__}: {_first_line(err)}).\n"
            + fixes_text(local_hint)
        ) from err


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line[:limit]


def download_file(url: str, dest: str, *, sha256: str | None = None, hash_prefix: str | None = None,
                  what: str = "file", local_hint: str = "", timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` atomically and check its SHA-256 (full ``sha256`` or a ``hash_prefix``).

    ``torch.hub.download_url_to_file`` writes a temp file beside ``dest``, compares the digest's first
    ``len(prefix)`` hex digits (all 64 for a full ``sha256``) and renames; a wrong hash deletes the temp file. Failures raise :class:`ModelDownloadError` naming ``what``,
    the URL and ``local_hint`` (where to put a copy by hand). The file ends up with the umask's mode.
    """
    import torch.hub  # torch is a dependency of every stage; imported here to keep this module light

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # download_url_to_file's urlopen takes no timeout: bound each socket read
    try:
        torch.hub.download_url_to_file(url, dest, hash_prefix=(sha256 or hash_prefix), progress=False)
    except Exception as err:  # noqa: BLE001 - every failure becomes one message naming the file and the fix
        raise ModelDownloadError(f"Could not download {what} from {url} to {dest}: {type(err).__name__}: "
                                 f"{_first_line(err)}. Download it by hand and {local_hint or f'put it at {dest}'}."
                                 ) from err
    finally:
        socket.setdefaulttimeout(before)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest, 0o666 & ~umask)  # download_url_to_file's NamedTemporaryFile is 0600
    return dest
