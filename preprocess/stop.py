"""Pre-emption for repa-preprocess: SIGTERM, SIGINT and a requeue signal (SIGUSR1 by default) stop the run cleanly.

SLURM sends SIGTERM to every process of the job step (then SIGKILL after KillWait, 30 s by default), and
`--signal=B:USR1@120` sends USR1 ahead of the time limit. On any of them the main process sets a flag; the
pass stops after the batch in hand, writes what is queued (shards that become complete are published),
drops the unfinished shards (their temp files only) and exits 0; the same command resumes. DataLoader
workers ignore these signals (`ignore_in_worker`), so a signal sent to the whole process group does not kill
them under the main process.
"""
from __future__ import annotations

import functools
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def parse_signal(name: str | None) -> int | None:
    """'USR1' / 'SIGUSR1' / '10' -> signal number; 'none' or '' -> None."""
    if name is None or str(name).lower() in ("", "none"):
        return None
    s = str(name).upper()
    if s.isdigit():
        return signal.Signals(int(s)).value
    try:
        return signal.Signals[s if s.startswith("SIG") else "SIG" + s].value
    except KeyError:
        raise ValueError(f"--requeue-signal: unknown signal {name!r} (use e.g. USR1, USR2 or none)") from None


class StopFlag:
    """Installs handlers for SIGTERM, SIGINT and `requeue` that record the first signal received."""

    def __init__(self, requeue: int | None):
        self.signals = STOP_SIGNALS + ((requeue,) if requeue else ())
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (run() called from a thread): no pre-emption handling
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def worker_init(self):
        """A picklable DataLoader worker_init_fn that ignores this flag's signals."""
        return functools.partial(ignore_in_worker, tuple(int(s) for s in self.signals))


def ignore_in_worker(signals: tuple[int, ...], worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
