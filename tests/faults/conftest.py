"""Fault-injection suite helpers: the fault ledger (counts quoted in README.md (Reliability)), forked
processes that get SIGKILLed at chosen points, one-thread determinism.

Every test records what it did with ``faults.record(faults=..., runs=..., records_lost=...)``; at the end of the
session the totals are printed and written to ``$REPA_FAULTS_SUMMARY`` (default
``.pytest_cache/repa-faults-summary.json``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import pytest
import torch

_LEDGER: dict[str, dict] = {}


class Ledger:
    def __init__(self, name: str):
        self.entry = _LEDGER.setdefault(name, {"faults": 0, "runs": 0, "records_lost": 0, "seconds": 0.0,
                                               "kinds": {}})

    def record(self, faults: int = 0, runs: int = 0, records_lost: int = 0, kind: str | None = None) -> None:
        e = self.entry
        e["faults"] += int(faults)
        e["runs"] += int(runs)
        e["records_lost"] += int(records_lost)
        if kind and faults:
            e["kinds"][kind] = e["kinds"].get(kind, 0) + int(faults)


@pytest.fixture
def faults(request):
    t0 = time.perf_counter()
    led = Ledger(request.node.name)
    yield led
    led.entry["seconds"] = round(led.entry["seconds"] + time.perf_counter() - t0, 2)


def pytest_sessionfinish(session, exitstatus):
    if not _LEDGER:
        return
    total = {k: sum(e[k] for e in _LEDGER.values()) for k in ("faults", "runs", "records_lost")}
    out = {"total": total, "tests": _LEDGER}
    path = os.environ.get("REPA_FAULTS_SUMMARY") or os.path.join(str(session.config.rootpath), ".pytest_cache",
                                                                 "repa-faults-summary.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _LEDGER:
        return
    tr = terminalreporter
    tr.section("fault injection")
    for name, e in sorted(_LEDGER.items()):
        tr.write_line(f"{name}: faults {e['faults']} {e['kinds'] or ''}, runs completed {e['runs']}, "
                      f"records lost {e['records_lost']}, {e['seconds']} s")
    t = {k: sum(e[k] for e in _LEDGER.values()) for k in ("faults", "runs", "records_lost")}
    tr.write_line(f"TOTAL: faults injected {t['faults']}, runs completed {t['runs']}, records lost {t['records_lost']}")


@pytest.fixture
def one_thread():
    """Bitwise comparisons between a forked (1 thread) run and in-process runs: use one thread everywhere."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_forked(target, timeout: float = 120.0) -> int:
    """Run ``target()`` in a forked copy of this process (torch already imported: no 3-5 s interpreter start).

    Returns the exit code, or ``-signal`` if the child was killed by a signal (e.g. -9 for SIGKILL).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            torch.set_num_threads(1)
            target()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"forked run did not finish in {timeout} s")
        time.sleep(0.01)


def sigkill_self():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(owner, attr: str, n: int = 1, before=None, when=None):
    """Patch ``owner.attr`` (in the forked child only) so that its ``n``-th call (counting only calls for which
    ``when(*args, **kwargs)`` is true, if given) SIGKILLs the process.

    ``before(*args, **kwargs)`` runs first on that call (e.g. to leave half a file behind)."""
    real = getattr(owner, attr)
    count = [0]

    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                if before is not None:
                    before(*args, **kwargs)
                sigkill_self()
        return real(*args, **kwargs)

    setattr(owner, attr, wrapper)
    return count
