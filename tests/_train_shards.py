"""Tiny shard sets for the trainer tests (repa.shards.synthetic: the real shards writer), tiny model settings."""
from __future__ import annotations

import pytest
import torch

from repa.shards.synthetic import synthetic_provenance, write_synthetic_set

TINY_MODEL = {"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 32}


# the package's synthetic writer (shared with bench/); the names the tests have always used
provenance = synthetic_provenance
write_shards = write_synthetic_set


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread (no thread-pool hand-offs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_train_config(shards: str, out, name: str, **overrides):
    """A TrainConfig for the tiny SiT on a shard set from :func:`write_shards` (4 steps, checkpoint every 2)."""
    from repa.trainer.train import TrainConfig
    base = dict(shards=shards, output_dir=str(out), exp_name=name, model="SiT-S/2", model_kwargs=dict(TINY_MODEL),
                encoder_depth=1, batch_size=8, max_train_steps=4, checkpointing_steps=2, mixed_precision="no",
                num_workers=0, sampling_steps=0)
    base.update(overrides)
    return TrainConfig(**base)
