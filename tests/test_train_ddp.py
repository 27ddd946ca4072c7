"""2-process DDP on CPU (torchrun --standalone --nproc_per_node 2, gloo) against 1 process.

tests/_ddp_train_script.py: (1) the same global batch and random draws, split over 2 ranks x 2 accumulated
micro-batches, must give the same weights (and EMA) as one process on the whole batch after 3 AdamW steps
with active clipping; (2) train() end to end with 2 processes: every rank's RNG/reader state in the
checkpoint, and a 2-process resume that is bitwise equal to the uninterrupted 2-process run.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _train_shards import write_shards

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), n=48)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run(torchrun + [os.path.join(HERE, "_ddp_train_script.py"), str(tmp_path), shards],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "result.json"))
    assert res["world"] == 2
    eq = res["equiv"]
    assert eq["moved"] > 1e-2                       # the weights really changed
    assert eq["max_param_diff"] < 1e-5 and eq["max_ema_diff"] < 1e-5
    # end to end: 2 ranks' states in the checkpoint, and a 2-process resume is bitwise
    ts = torch.load(os.path.join(res["full"]["checkpoint"], "train_state.pt"), weights_only=True)
    assert ts["world_size"] == 2 and [r["loader"]["rank"] for r in ts["ranks"]] == [0, 1]
    assert not torch.equal(ts["ranks"][0]["rng"]["torch"], ts["ranks"][1]["rng"]["torch"])  # seed + rank
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(os.path.join(res["full"]["checkpoint"], f))
        b = load_file(os.path.join(res["resumed"]["checkpoint"], f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    first = open(tmp_path / "full" / "log.txt").readline()
    assert "processes=2 device=cpu" in first and "mixed_precision=no" in first


@pytest.mark.slow
def test_ddp_bad_record_on_one_rank_stops_both_with_checkpoint(tmp_path):
    """A corrupt record in rank 1's second shard: rank 1 answers with a zero batch, the flag rides in the step's
    all-reduce, both ranks save step 4 (the last good one) together and exit 1; nobody hangs."""
    import numpy as np
    from repa.shards import read_manifest
    from repa.trainer.checkpoint import list_checkpoints
    shards = write_shards(str(tmp_path / "shards"), n=64, records_per_shard=16)
    order = np.random.default_rng([0, 0]).permutation(4)  # the reader's shard order of epoch 0 (seed 0)
    bad = f"shard-{int(order[3]):06d}.tar"  # rank 1 reads order[2] then order[3], one shard per window
    m = read_manifest(shards)
    p = os.path.join(shards, bad)
    data = bytearray(open(p, "rb").read())
    data[3 * m.record_bytes + 512 + 5] ^= 0x40
    open(p, "wb").write(bytes(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "repa.trainer.cli", "--shards", shards, "--output-dir", str(tmp_path / "o"), "--exp-name", "bad",
           "--model", "SiT-S/2", "--model-kwargs", json.dumps({"depth": 2, "hidden_size": 32, "num_heads": 2,
                                                               "projector_dim": 32}),
           "--encoder-depth", "1", "--batch-size", "8", "--max-train-steps", "12", "--checkpointing-steps", "1000",
           "--shuffle-window", "16", "--mixed-precision", "no", "--num-workers", "0", "--sampling-steps", "0",
           "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert bad in out and "--skip-bad" in out and "another rank read a corrupt record" in out, out[-3000:]
    ckpts = list_checkpoints(str(tmp_path / "o" / "bad" / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == ["0000004"], out[-3000:]
    ts = torch.load(os.path.join(ckpts[0], "train_state.pt"), weights_only=True)
    assert ts["step"] == 4 and ts["world_size"] == 2 and [r["loader"]["batches"] for r in ts["ranks"]] == [4, 4]
