"""Killed processes (SIGKILL at chosen points, then the same command again) and pre-emption (SIGTERM).

The killed runs are forks of the test process running the console scripts' entry points (the same code as
``repa-preprocess`` / ``repa-train`` / ``repa-sample``; a fork saves the 3-5 s interpreter + torch start);
the SIGTERM test starts a real ``python -m repa.trainer.cli`` process. Kill points are chosen, not random, so the
suite is deterministic: in the middle of a record of a shard, between a shard's rename and its sidecar, in the
middle of a checkpoint's train_state.pt, in the middle of a PNG, just before the .npz rename.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faults.conftest import kill_on_call, run_forked
from repa.shards import storage

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers

def tar_records(out) -> dict[int, dict[str, bytes]]:
    """{key: {member extension: raw bytes}} of every finished shard (read with the standard library)."""
    recs: dict[int, dict[str, bytes]] = {}
    for p in sorted(Path(out).glob("shard-*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                recs.setdefault(int(key), {})[field] = tf.extractfile(m).read()
    return recs


def assert_no_truncated_tar(out) -> int:
    """Every file under a final shard name is a complete archive (a partial one has no end-of-archive block)."""
    n = 0
    for p in Path(out).glob("shard-*.tar"):
        data = p.read_bytes()
        assert len(data) % 512 == 0 and data[-1024:] == b"\0" * 1024, f"{p} is truncated"
        with tarfile.open(p) as tf:
            tf.getmembers()
        n += 1
    return n


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(10):
        d = root / f"class{i % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 31 - i, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return root


def preprocess_args(image_dir, out):
    return [f"imagefolder:{image_dir}", "--res", "16", "--vae", "none", "--enc-type", "none", "--out", str(out),
            "--shard-size", "4", "--batch-size", "2", "--num-workers", "0", "--no-progress"]


def run_preprocess(args):
    from repa.preprocess.cli import main
    return main.main(args, standalone_mode=False)


# ---------------------------------------------------------------- 1. SIGKILL: repa-preprocess

def test_preprocess_sigkill_mid_shard_and_before_sidecar(image_dir, tmp_path, one_thread, faults):
    ref = tmp_path / "ref"
    run_preprocess(preprocess_args(image_dir, ref))
    out = tmp_path / "killed"
    args = preprocess_args(image_dir, out)

    def kill_mid_record():  # 6th record = the 2nd of shard 1: leave half a record in its temp file, then die
        from repa.shards.writer import ShardWriter
        kill_on_call(ShardWriter, "write", 6, before=lambda self, *a, **k: (self._f.write(b"\1" * 700),
                                                                             self._f.flush()))
        run_preprocess(args)

    def kill_before_sidecar():  # shard 2's tar is renamed to its final name, its sidecar is not written yet
        from repa.shards import storage
        kill_on_call(storage, "write_bytes", 1, when=lambda url, *a, **k: url.endswith("shard-000002.tar.json"))
        run_preprocess(args)

    assert run_forked(kill_mid_record) == -signal.SIGKILL
    names = os.listdir(out)
    assert "manifest.json" not in names and any(storage.is_own_temp(n) for n in names)
    assert assert_no_truncated_tar(out) == 1  # shard 0 only
    assert run_forked(kill_before_sidecar) == -signal.SIGKILL
    assert assert_no_truncated_tar(out) == 3 and not (out / "shard-000002.tar.json").exists()
    summary = run_preprocess(args)  # the same command again
    assert summary["records"] == 10 and summary["records_written"] == 2  # only shard 2 (no sidecar) redone
    assert not [n for n in os.listdir(out) if storage.is_own_temp(n) or ".tmp-" in n]
    got, want = tar_records(out), tar_records(ref)
    assert sorted(got) == sorted(want) == list(range(10))
    assert got == want  # bitwise the same records
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((ref / "manifest.json").read_text())["shards"]  # same names, sizes, sha256
    faults.record(faults=2, kind="SIGKILL", runs=2, records_lost=len(set(want) - set(got)))


# ---------------------------------------------------------------- 1. SIGKILL: repa-train

@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    from _train_shards import write_shards
    return write_shards(str(tmp_path_factory.mktemp("tshards") / "set"), n=32)


def train_cfg(shards, out, name, **kw):
    from _train_shards import tiny_train_config
    return tiny_train_config(shards, out, name, **{"resume": "auto", **kw})


def assert_same_weights(a, b):
    for name in ("model.safetensors", "ema.safetensors"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name


def test_train_sigkill_during_checkpoint_write(train_shards, tmp_path, one_thread, faults):
    from repa.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from repa.trainer.train import train
    ref = train(train_cfg(train_shards, tmp_path, "ref"))
    cfg = train_cfg(train_shards, tmp_path, "run")
    root = tmp_path / "run" / "checkpoints"

    def half_written(obj, f, *a, **k):  # the real bytes, cut in half, where the checkpoint was being written
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()

    real_save = torch.save

    def is_train_state(obj, f, *a, **k):  # torch.save gets the open file (a path would lose the errno)
        return str(getattr(f, "name", f)).endswith("train_state.pt")

    def killed_run():
        kill_on_call(torch, "save", 2, before=half_written, when=is_train_state)
        train(cfg)

    assert run_forked(killed_run) == -signal.SIGKILL
    assert sorted(os.listdir(root))[0] == "0000002" and not (root / "0000004").exists()  # no half checkpoint visible
    assert latest_checkpoint(str(root)).endswith("0000002")
    load_checkpoint(latest_checkpoint(str(root)))  # the previous one is intact
    resumed = train(cfg)  # the same command again (--resume auto)
    assert resumed["step"] == 4
    assert sorted(os.listdir(root)) == ["0000002", "0000004"]  # the killed save's temp dir was cleaned up
    assert_same_weights(ref["checkpoint"], resumed["checkpoint"])
    a, b = load_checkpoint(ref["checkpoint"])["train_state"], load_checkpoint(resumed["checkpoint"])["train_state"]
    assert a["ranks"][0]["loader"] == b["ranks"][0]["loader"]
    faults.record(faults=1, kind="SIGKILL", runs=1)


# ---------------------------------------------------------------- 2. SIGTERM: repa-train checkpoints and exits

def test_train_sigterm_checkpoints_and_exits(train_shards, tmp_path, one_thread, faults):
    from _train_shards import TINY_MODEL
    from repa.trainer.checkpoint import list_checkpoints
    from repa.trainer.train import train
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "repa.trainer.cli", "--shards", train_shards, "--output-dir", str(out), "--exp-name", "t",
           "--model", "SiT-S/2", "--model-kwargs", json.dumps(TINY_MODEL), "--encoder-depth", "1", "--batch-size", "8",
           "--max-train-steps", "100000", "--checkpointing-steps", "100000", "--mixed-precision", "no",
           "--num-workers", "0", "--sampling-steps", "0", "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "t" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "trainer did not start"
            time.sleep(0.05)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert rc == 0, log[-3000:]
    assert stopped_in < 30, stopped_in  # one step + one checkpoint on this tiny model; generous for loaded CI
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    ckpts = list_checkpoints(str(out / "t" / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == [f"{steps[-1]:07d}"]  # checkpoint of the last step done
    assert "stop signal received" in log
    # resuming that checkpoint gives the same weights as an uninterrupted run
    stop = steps[-1] + 1
    ref = train(train_cfg(train_shards, tmp_path, "ref", max_train_steps=stop, checkpointing_steps=10**6))
    res = train(train_cfg(train_shards, out, "t", max_train_steps=stop, checkpointing_steps=10**6))
    assert_same_weights(ref["checkpoint"], res["checkpoint"])
    faults.record(faults=1, kind="SIGTERM", runs=2)
    print(f"SIGTERM at step {steps[-1]}: exited 0 in {stopped_in:.2f} s")


# ---------------------------------------------------------------- 1. SIGKILL: repa-sample

def test_sample_sigkill_mid_png_and_before_npz(tmp_path, one_thread, faults):
    from test_sampler_generate import make_checkpoint
    from repa.sampler.sample_cli import main as sample_main
    _, ckpt = make_checkpoint(str(tmp_path / "ck"))
    args = ["--ckpt", ckpt, "--num-fid-samples", "6", "--num-steps", "2", "--per-proc-batch-size", "2",
            "--global-seed", "1", "--no-progress"]
    ref = sample_main(args + ["--sample-dir", str(tmp_path / "ref")])
    run = args + ["--sample-dir", str(tmp_path / "run")]

    def truncate_src(src, dst, *a, **k):
        os.truncate(src, os.path.getsize(src) // 2)

    def kill_mid_png():  # the 4th PNG: half written to its temp name, then the process dies
        kill_on_call(os, "replace", 1, before=truncate_src, when=lambda s, d, *a, **k: str(d).endswith("000003.png"))
        sample_main(run)

    def kill_before_npz():
        kill_on_call(os, "replace", 1, when=lambda s, d, *a, **k: str(d).endswith(".npz"))
        sample_main(run)

    assert run_forked(kill_mid_png) == -signal.SIGKILL
    folder = next(p for p in (tmp_path / "run").iterdir() if p.is_dir())
    pngs = sorted(folder.glob("*.png"))
    assert "000003.png" not in [p.name for p in pngs] and len(pngs) < 6
    for p in pngs:  # nothing truncated under a final name
        Image.open(p).load()
    assert run_forked(kill_before_npz) == -signal.SIGKILL
    assert not list((tmp_path / "run").glob("*.npz")) and len(list(folder.glob("*.png"))) == 6
    npz = sample_main(run)
    assert os.path.basename(npz) == os.path.basename(ref)
    assert Path(npz).read_bytes() == Path(ref).read_bytes()  # the same samples, to the byte
    from repa.sampler.npz import is_temp_name
    leftovers = [n for n in os.listdir(folder) if is_temp_name(n)]
    faults.record(faults=2, kind="SIGKILL", runs=2)
    assert leftovers == []  # the rerun removed the killed runs' temp files
