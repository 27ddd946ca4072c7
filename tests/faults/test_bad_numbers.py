"""Bad numbers: non-finite values in the shards, a learning rate that diverges. The trainer stops with the step,
the cause and the last good checkpoint, and saves nothing after it."""
from __future__ import annotations

import os

import pytest

from _train_shards import write_shards
from faults.test_kill import train_cfg
from repa.trainer.checkpoint import list_checkpoints
from repa.trainer.train import NonFiniteLossError, train


def test_inf_in_shard_stops_naming_field_and_key(tmp_path, faults):
    bad_key = 13
    shards = write_shards(str(tmp_path / "s"), n=32, seed=2)
    # rewrite the set with an inf teacher feature in one record (same layout, written by the real writer)
    from repa.shards import ShardSetWriter, ShardStream, finalize_manifest, read_manifest
    m = read_manifest(shards)
    recs = {int(k): {f: v[i] for f, v in b.items() if f != "key"}
            for b in ShardStream(shards, 32, shuffle=False) for i, k in enumerate(b["key"])}
    recs[bad_key]["feat.0"] = recs[bad_key]["feat.0"].clone()
    recs[bad_key]["feat.0"][3, 5] = float("inf")
    bad = str(tmp_path / "bad")
    with ShardSetWriter(bad, m.fields, records_per_shard=16) as w:
        for k in range(32):
            w.write(k, recs[k])
    finalize_manifest(bad, m.fields, m.provenance, expected_records=32)
    with pytest.raises(NonFiniteLossError) as e:
        train(train_cfg(bad, tmp_path, "inf", max_train_steps=8, checkpointing_steps=1))
    msg = str(e.value)
    step = int(msg.split("at step ")[1].split()[0])
    ckpts = [os.path.basename(c) for c in list_checkpoints(str(tmp_path / "inf" / "checkpoints"))]
    assert ckpts == [f"{s:07d}" for s in range(1, step)]  # every step before the bad one, none after
    assert (f"checkpoints/{step - 1:07d}" in msg) if step > 1 else ("no checkpoint" in msg)
    assert "feat.0" in msg and str(bad_key) in msg, msg  # the cause: which field of which record
    faults.record(faults=1, kind="inf in shard", runs=0)


def test_diverging_learning_rate_stops(tmp_path, train_shards_small, faults):
    with pytest.raises(NonFiniteLossError) as e:
        train(train_cfg(train_shards_small, tmp_path, "lr", learning_rate=1e30, max_grad_norm=1e30,
                        max_train_steps=6, checkpointing_steps=1))
    msg = str(e.value)
    step = int(msg.split("at step ")[1].split()[0])
    assert step >= 2 and f"checkpoints/{step - 1:07d}" in msg
    assert "learning-rate" in msg and "inputs are finite" in msg, msg
    faults.record(faults=1, kind="diverging lr", runs=0)


@pytest.fixture(scope="module")
def train_shards_small(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("ts") / "set"), n=16)

