"""repa-train under a cluster: pre-emption of the whole process group (SIGTERM, the requeue signal SIGUSR1) with
DataLoader workers, two jobs pointed at one experiment, a SIGKILL between checkpoints then the same command again.

Real processes (``python -m repa.trainer.cli`` in its own session, so ``os.killpg`` reaches the trainer and its
reader workers like SLURM's signal to the job step) and real signals; nothing is mocked."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults.conftest import kill_on_call, run_forked
from faults.test_kill import REPO, assert_same_weights, train_cfg

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from _train_shards import write_shards
    return write_shards(str(tmp_path_factory.mktemp("pshards") / "set"), n=32)


def cli(shards, out, name, *extra):
    from _train_shards import TINY_MODEL
    return [sys.executable, "-m", "repa.trainer.cli", "--shards", shards, "--output-dir", str(out),
            "--exp-name", name, "--model", "SiT-S/2", "--model-kwargs", json.dumps(TINY_MODEL), "--encoder-depth", "1",
            "--batch-size", "8", "--max-train-steps", "100000", "--mixed-precision", "no", "--sampling-steps", "0",
            *extra]


def start(cmd):
    return subprocess.Popen(cmd, cwd=str(REPO), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, like a job step


def wait_steps(proc, metrics: Path, n: int, timeout=120):
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "trainer did not start"
        time.sleep(0.05)


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file()}


def stop_group(proc, sig=signal.SIGKILL):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_group_signal_with_workers_checkpoints_and_exits_zero(shards, tmp_path, one_thread, faults, sig):
    from repa.trainer.checkpoint import list_checkpoints
    from repa.trainer.train import train
    out = tmp_path / "o"
    proc = start(cli(shards, out, "t", "--num-workers", "2", "--checkpointing-steps", "100000"))
    metrics = out / "t" / "metrics.jsonl"
    try:
        wait_steps(proc, metrics, 3)
        t0 = time.time()
        os.killpg(proc.pid, sig)  # the trainer AND its 2 reader workers, like scancel / SLURM's pre-emption
        rc = proc.wait(timeout=60)
        stopped_in = time.time() - t0
    finally:
        stop_group(proc)
    log = proc.stdout.read()
    assert rc == 0, log[-3000:]
    assert stopped_in < 20, stopped_in  # one step + one checkpoint; SLURM's KillWait default is 30 s
    assert f"stop signal received: {signal.Signals(sig).name}" in log, log[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1))
    ckpts = list_checkpoints(str(out / "t" / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == [f"{steps[-1]:07d}"]
    if sig == signal.SIGTERM:  # the resume of the group-killed run is bitwise an uninterrupted one (2 workers)
        stop = steps[-1] + 1
        ref = train(train_cfg(shards, tmp_path, "ref", max_train_steps=stop, checkpointing_steps=10**6, num_workers=2))
        res = train(train_cfg(shards, out, "t", max_train_steps=stop, checkpointing_steps=10**6, num_workers=2))
        assert_same_weights(ref["checkpoint"], res["checkpoint"])
    faults.record(faults=1, kind=f"{signal.Signals(sig).name} to the process group", runs=1)
    print(f"{signal.Signals(sig).name} to the group at step {steps[-1]}: exited 0 in {stopped_in:.2f} s")


def test_second_writer_refused_naming_the_holder(shards, tmp_path, faults):
    out = tmp_path / "o"
    first = start(cli(shards, out, "x", "--num-workers", "0", "--checkpointing-steps", "2"))
    try:
        wait_steps(first, out / "x" / "metrics.jsonl", 3)
        root = out / "x" / "checkpoints"
        while not list(root.glob("0000002")):
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # freeze the first run so its files can be compared
        before = hashes(root)
        second = subprocess.run(cli(shards, out, "x", "--num-workers", "0", "--checkpointing-steps", "1"),
                                cwd=str(REPO), env=ENV, capture_output=True, text=True, timeout=120)
        after = hashes(root)
        os.kill(first.pid, signal.SIGCONT)
    finally:
        os.kill(first.pid, signal.SIGCONT)
        stop_group(first, signal.SIGTERM)
    msg = second.stdout + second.stderr
    assert second.returncode == 1, msg[-3000:]
    assert "locked by another run" in msg and f"pid {first.pid}" in msg and "repa-train" in msg, msg[-3000:]
    assert str(out / "x") in msg
    assert after == before  # not one byte (nor inode) of the first run's checkpoints changed
    assert first.returncode == 0
    faults.record(faults=1, kind="two writers", runs=1)


def test_sigkill_between_checkpoints_rerun_has_no_repeated_steps(shards, tmp_path, one_thread, faults):
    from repa.trainer import train as train_mod
    from repa.trainer.metrics import read_jsonl
    cfg = train_cfg(shards, tmp_path, "k", max_train_steps=4, checkpointing_steps=2, resume=None)
    ref = train_mod.train(train_cfg(shards, tmp_path, "ref", max_train_steps=4, checkpointing_steps=2))

    def killed():  # dies during step 4: steps 1-3 are logged, the newest checkpoint is step 2
        kill_on_call(train_mod, "update_ema", 4)
        train_mod.train(cfg)

    assert run_forked(killed) == -signal.SIGKILL
    metrics = tmp_path / "k" / "metrics.jsonl"
    assert [r["step"] for r in read_jsonl(str(metrics))] == [1, 2, 3]
    res = train_mod.train(cfg)  # the same command again, no --resume: a SLURM requeue
    assert res["step"] == 4
    recs = read_jsonl(str(metrics))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["loss"] for r in recs] == [r["loss"] for r in read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))]
    assert_same_weights(ref["checkpoint"], res["checkpoint"])
    faults.record(faults=1, kind="SIGKILL between checkpoints", runs=1)
