"""DataLoader workers of make_loader ignore SIGTERM/SIGINT/SIGUSR1: a signal sent to the whole process group
(SLURM) reaches only the main process's handler and the workers keep delivering."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_shards_rw import write_set

_MAIN = r"""
import multiprocessing as mp, signal, sys, time
from repa.shards import ShardStream, make_loader
got = []
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
it = iter(make_loader(ShardStream(sys.argv[1], 2, infinite=True, shuffle_window=4), num_workers=2))
next(it)
print("READY", *sorted(p.pid for p in mp.active_children()), flush=True)
deadline = time.time() + 60
while len(got) < 3 and time.time() < deadline:
    next(it)
    time.sleep(0.01)
keys = [int(k) for _ in range(6) for k in next(it)["key"]]  # the workers still deliver after the signals
print("GOT", *got, flush=True)
print("KEYS", *keys, flush=True)
print("ALIVE", *sorted(p.pid for p in mp.active_children()), flush=True)
"""


def test_group_signals_reach_only_the_main_process(tmp_path, faults):
    write_set(tmp_path, 9, 4)
    p = subprocess.Popen([sys.executable, "-c", _MAIN, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready = p.stdout.readline().split()
        assert ready and ready[0] == "READY", p.stderr.read()
        workers = ready[1:]
        assert len(workers) == 2
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.killpg(p.pid, sig)  # what SLURM does: the whole process group, workers included
            time.sleep(0.3)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
    assert p.returncode == 0, err
    lines = dict((ln.split()[0], ln.split()[1:]) for ln in out.splitlines() if ln)
    assert lines["GOT"] == [str(int(s)) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
    assert lines["ALIVE"] == workers  # the same two workers, not killed, not restarted
    keys = [int(k) for k in lines["KEYS"]]
    assert len(keys) == 12 and set(keys) <= set(range(9))
    faults.record(faults=3, runs=1, kind="group signal to DataLoader workers")
