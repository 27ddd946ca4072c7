"""Pre-emption of a real `python -m repa.preprocess` process with DataLoader workers (issue #11 item 3):
SIGTERM to the whole process group (what SLURM does at the time limit) and the requeue signal SIGUSR1 stop
the run cleanly (exit 0, bounded time, unfinished shards dropped, no manifest); the same command then
finishes the set, every record exactly once and equal to an uninterrupted run's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults.test_preprocess_resume import cli, make_folder, pp_args, tar_records

REPO = Path(__file__).resolve().parents[2]
N = 1200


@pytest.fixture(scope="module")
def folder_and_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("sig")
    make_folder(root / "data", N)
    cli(pp_args(root / "data", root / "ref", shard_size=20, batch=4))
    return root / "data", tar_records(root / "ref")


def _signal_mid_run(data, out, sig: int, group: bool) -> tuple[int, float, str]:
    args = [*pp_args(data, out, shard_size=20, batch=4), "--num-workers", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "repa.preprocess", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "shard-000001.tar.json").exists():  # two shards done: the workers are running
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "repa-preprocess did not start"
            time.sleep(0.005)
        t0 = time.time()
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
        return rc, time.time() - t0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, True), (signal.SIGUSR1, True)],
                         ids=["SIGTERM-group", "SIGUSR1-group"])  # SIGINT takes the same handler
def test_signal_stops_cleanly_and_rerun_completes(folder_and_ref, tmp_path, sig, group, faults):
    data, want = folder_and_ref
    out = tmp_path / "out"
    rc, seconds, log = _signal_mid_run(data, out, sig, group)
    assert rc == 0, log[-3000:]
    assert seconds < 20, seconds  # one batch + the writes in flight; SLURM's default KillWait is 30 s
    name = signal.Signals(sig).name
    assert f"stopped by {name}" in log and "rerun the same command" in log, log[-2000:]
    names = os.listdir(out)
    assert "manifest.json" not in names, "the signal came after the run had finished: use more images"
    assert not [n for n in names if ".repa-tmp-" in n]  # unfinished shards dropped, nothing half-written
    done = sorted(n for n in names if n.endswith(".tar.json"))
    assert 2 <= len(done) < N // 20
    s = cli(pp_args(data, out, shard_size=20, batch=4))
    got = tar_records(out)
    assert s["records"] == N and s["records_written"] == N - 20 * len(done)
    assert sorted(got) == list(range(N)) and got == want  # every record once, the same bytes
    faults.record(faults=1, kind=name, runs=1, records_lost=N - len(got))
    print(f"{name}: exited 0 in {seconds:.2f} s with {len(done)} shards finished")
