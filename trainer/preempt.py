"""Pre-emption: SIGTERM, SIGINT and the requeue signal (``--requeue-signal``, SIGUSR1 by default) ask the run to
stop; the loop finishes its current step, every rank saves the checkpoint together and the process exits 0.

The handler only sets a flag (it never runs training code inside a signal handler); the flag travels in the
step's one all-reduce, so all ranks stop after the same step even if only one got the signal. DataLoader
workers must not die of these signals (a signal sent to the whole process group reaches them too): the shard
reader's workers ignore SIGTERM, SIGINT and the requeue signal (``make_loader(ignore_signals=...)``).
"""
from __future__ import annotations

import signal
import time

FORCE_AFTER_S = 1.0  # a SIGINT this long after the first stop signal interrupts at once (no checkpoint)


def parse_signal(name: str | None) -> signal.Signals | None:
    """'USR1', 'SIGUSR1', '10' -> signal.SIGUSR1; 'none' or '' -> None."""
    if not name or str(name).lower() == "none":
        return None
    text = str(name).upper()
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG")
                                                                                else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"--requeue-signal {name}: not a signal name; use e.g. USR1, USR2 or none") from None


class StopFlag:
    """Installs the stop handlers; ``received`` is the name of the first stop signal (None until one comes)."""

    def __init__(self, requeue_signal: str | None = "USR1"):
        self.signals = [signal.SIGTERM, signal.SIGINT]
        extra = parse_signal(requeue_signal)
        if extra is not None and extra not in self.signals:
            self.signals.append(extra)
        self.received: str | None = None
        self.at = 0.0
        self.previous = {}

    @property
    def set(self) -> bool:
        return self.received is not None

    def install(self) -> "StopFlag":
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no pre-emption handling
                pass
        return self

    def _handler(self, signum, frame):
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.at > FORCE_AFTER_S:
            # a second Ctrl-C: the user does not want to wait for the checkpoint. Not within FORCE_AFTER_S of the
            # first signal: one Ctrl-C under torchrun arrives twice (the terminal's SIGINT, torchrun's SIGTERM)
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
