"""Tiny shard sets for the trainer tests and bench (written with the real shards writer)."""
from __future__ import annotations

import pytest
import torch

from repa.shards import FieldSpec, ShardSetWriter, finalize_manifest

TINY_MODEL = {"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 32}


def provenance(latent: int, channels: int, teachers: list[tuple[int, int]], num_classes: int,
               vae_id: str | None = None, haste: dict | None = None, teacher_meta: list[dict] | None = None) -> dict:
    """A manifest provenance like repa-preprocess writes (CONTRACTS.md)."""
    metas = teacher_meta or [{"name": f"test-teacher-{i}", "id": None, "tokens": t, "dim": d,
                              "grid": [int(t ** 0.5)] * 2, "codec": "bf16"} for i, (t, d) in enumerate(teachers)]
    for i, m in enumerate(metas):
        m["field"] = f"feat.{i}"
    return {"source": "synthetic", "resolution": latent * 8, "crop": "adm",
            "vae": {"id": vae_id, "latent_channels": channels, "downsample": 8,
                    "scale": [0.5] * channels, "bias": [0.1] * channels},
            "latent_size": latent, "teachers": metas, "num_classes": num_classes, "flip": False,
            "haste": haste, "skipped": [], "repa_version": "0.1.0"}


def write_shards(out: str, n: int = 48, *, latent: int = 8, channels: int = 4, teachers=((16, 16),),
                 num_classes: int = 10, records_per_shard: int = 16, seed: int = 0, extra_fields=None,
                 extra_data=None, **prov_kwargs) -> str:
    """n records: moments (2C, L, L) = [mean | std], labels, one feat.<i> (T, D) per teacher (bf16)."""
    g = torch.Generator().manual_seed(seed)
    fields = {"moments": FieldSpec((2 * channels, latent, latent), "float32", "raw"),
              "label": FieldSpec((), "int64", "raw")}
    for i, (t, d) in enumerate(teachers):
        fields[f"feat.{i}"] = FieldSpec((t, d), "bfloat16", "bf16")
    fields.update(extra_fields or {})
    with ShardSetWriter(out, fields, records_per_shard=records_per_shard) as w:
        for key in range(n):
            sample = {"moments": torch.cat([torch.randn(channels, latent, latent, generator=g),
                                            0.1 * torch.rand(channels, latent, latent, generator=g)]),
                      "label": torch.tensor(key % num_classes)}
            for i, (t, d) in enumerate(teachers):
                sample[f"feat.{i}"] = torch.randn(t, d, generator=g)
            if extra_data:
                sample.update(extra_data(key, g))
            w.write(key, sample)
    finalize_manifest(out, fields, provenance(latent, channels, list(teachers), num_classes, **prov_kwargs),
                      expected_records=n)
    return out


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
