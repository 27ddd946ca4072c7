"""repa-train and its storage: a read-only checkpoint folder (a real read-only bind mount), a corrupt newest
checkpoint, a REAL full file system (a tiny tmpfs: ENOSPC inside safetensors and inside torch.save), file modes
under the umask, and a corrupt record in the middle of a run (with and without --skip-bad)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from _train_shards import TINY_MODEL, write_shards
from faults.test_kill import assert_same_weights, train_cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("sshards") / "set"), n=32)


def _mount(*args):
    if os.geteuid() != 0:
        pytest.skip("needs root for mount (tmpfs / read-only bind)")
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"mount {' '.join(args)} not permitted here: {p.stderr.strip()}")


def _umount(path):
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], check=False)  # still busy: detach it lazily


def _args(shards, out, name, *extra):
    return ["--shards", shards, "--output-dir", str(out), "--exp-name", name, "--model", "SiT-S/2",
            "--model-kwargs", json.dumps(TINY_MODEL), "--encoder-depth", "1", "--batch-size", "8",
            "--mixed-precision", "no", "--num-workers", "0", "--sampling-steps", "0", *extra]


def test_read_only_checkpoint_folder_refused_before_step_1(shards, tmp_path, faults):
    from repa.trainer.cli import main
    root = tmp_path / "o" / "ro" / "checkpoints"
    root.mkdir(parents=True)
    _mount("--bind", str(root), str(root))
    try:
        _mount("-o", "remount,ro,bind", str(root))
        r = CliRunner().invoke(main, _args(shards, tmp_path / "o", "ro", "--max-train-steps", "2"))
    finally:
        _umount(root)
    assert r.exit_code == 2, r.output
    assert f"checkpoint folder {root} is not writable" in r.output and "Read-only file system" in r.output, r.output
    assert not (tmp_path / "o" / "ro" / "metrics.jsonl").exists()  # not one step
    faults.record(faults=1, kind="read-only checkpoint folder", runs=0)


def test_corrupt_newest_checkpoint_falls_back_to_intact_one(shards, tmp_path, faults):
    from repa.trainer.train import train
    ref = train(train_cfg(shards, tmp_path, "ref", max_train_steps=6))
    train(train_cfg(shards, tmp_path, "run", max_train_steps=4))  # checkpoints 2 and 4
    root = tmp_path / "run" / "checkpoints"
    bad = root / "0000004" / "model.safetensors"
    half = bad.stat().st_size // 2
    os.truncate(bad, half)  # e.g. a node died while the file system flushed it
    res = train(train_cfg(shards, tmp_path, "run", max_train_steps=6))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"checkpoint {root / '0000004'} is unreadable" in log and "model.safetensors" in log, log
    assert f"resuming from {root / '0000002'} (step 2)" in log
    kept = [n for n in os.listdir(root) if n.startswith("0000004.corrupt")]
    assert len(kept) == 1 and (root / kept[0] / "model.safetensors").stat().st_size == half  # kept, not deleted
    assert res["step"] == 6
    assert_same_weights(ref["checkpoint"], res["checkpoint"])  # resumed from 2: the same result as never stopping
    faults.record(faults=1, kind="truncated checkpoint", runs=1)


def _fill(mount: Path, leave: int):
    """Fill the tmpfs up to ``leave`` free bytes with one file."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("where", ["model.safetensors", "train_state.pt"])
def test_real_enospc_names_checkpoint_and_intact_previous(shards, tmp_path, faults, where):
    from repa.trainer.train import train
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
    try:
        train(train_cfg(shards, mnt, "run", max_train_steps=1, checkpointing_steps=1))
        c1 = mnt / "run" / "checkpoints" / "0000001"
        sizes = {p.name: p.stat().st_size for p in c1.iterdir()}
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in c1.iterdir()}
        room = 64 * 1024 + (0 if where == "model.safetensors" else sizes["model.safetensors"] + sizes["ema.safetensors"])
        _fill(mnt, room)
        with pytest.raises(OSError) as e:
            train(train_cfg(shards, mnt, "run", max_train_steps=2, checkpointing_steps=1))
        msg = str(e.value)
        assert e.value.errno == errno.ENOSPC, msg
        assert f"writing checkpoint {mnt / 'run' / 'checkpoints' / '0000002'} failed" in msg and where in msg, msg
        assert f"previous checkpoint {c1} is intact" in msg, msg
        assert sorted(os.listdir(c1.parent)) == ["0000001"]  # nothing half-written published, temp dir removed
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in c1.iterdir()} == before
        os.remove(mnt / "filler")
        assert train(train_cfg(shards, mnt, "run", max_train_steps=2, checkpointing_steps=1))["step"] == 2
    finally:
        _umount(mnt)
    faults.record(faults=1, kind=f"real ENOSPC in {where}", runs=1)


def test_checkpoint_files_respect_the_umask(shards, tmp_path):
    from repa.trainer.train import train
    old = os.umask(0o022)
    try:
        out = train(train_cfg(shards, tmp_path, "mode", max_train_steps=1, checkpointing_steps=1))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in Path(out["checkpoint"]).iterdir()}
    assert modes == {"model.safetensors": 0o644, "ema.safetensors": 0o644, "train_state.pt": 0o644,
                     "config.json": 0o644}
    assert Path(out["checkpoint"]).stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- a corrupt record mid-run

def _flip_one_record(src, dst, shard="shard-000001.tar", record=3):
    from repa.shards import read_manifest
    shutil.copytree(src, dst)
    m = read_manifest(str(dst))
    p = Path(dst) / shard
    data = bytearray(p.read_bytes())
    data[record * m.record_bytes + 512 + 5] ^= 0x40  # a data byte of the first field: CRC-32 mismatch
    p.write_bytes(bytes(data))
    return str(dst), 16 + record  # shard 1 holds keys 16..31


def test_bad_record_mid_run_stops_with_checkpoint_or_skips(shards, tmp_path, faults):
    from repa.trainer.checkpoint import list_checkpoints, load_checkpoint
    from repa.trainer.cli import main
    from repa.trainer.metrics import read_jsonl
    bad, key = _flip_one_record(shards, tmp_path / "bad")
    common = ("--max-train-steps", "8", "--checkpointing-steps", "1000", "--shuffle-window", "16")
    r = CliRunner().invoke(main, _args(bad, tmp_path / "o", "strict", *common))
    assert r.exit_code == 1, r.output
    assert "shard-000001.tar" in r.output and f"key {key}" in r.output and "--skip-bad" in r.output, r.output
    done = [m["step"] for m in read_jsonl(str(tmp_path / "o" / "strict" / "metrics.jsonl"))]
    assert done and done == list(range(1, done[-1] + 1))
    ckpts = list_checkpoints(str(tmp_path / "o" / "strict" / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == [f"{done[-1]:07d}"]  # the last good step, saved on the way out
    assert load_checkpoint(ckpts[-1])["train_state"]["step"] == done[-1]
    assert f"saved checkpoint {ckpts[-1]}" in r.output
    r = CliRunner().invoke(main, _args(bad, tmp_path / "o", "skip", *common, "--skip-bad"))
    assert r.exit_code == 0, r.output
    recs = read_jsonl(str(tmp_path / "o" / "skip" / "metrics.jsonl"))
    assert [m["step"] for m in recs] == list(range(1, 9))
    assert recs[-1]["skipped_records"] >= 1 and recs[0]["skipped_records"] <= recs[-1]["skipped_records"]
    log = (tmp_path / "o" / "skip" / "log.txt").read_text()
    assert "skipped 1 bad record" in log, log
    faults.record(faults=2, kind="corrupt record mid-run", runs=1)
