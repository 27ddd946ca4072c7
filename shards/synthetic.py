"""Random shard sets that follow the REPA record contract, written with the real writer.

For smoke tests of a cluster setup (``repa-train`` on a synthetic set needs no dataset, VAE or teacher), the
benchmarks and the test suite: ``write_synthetic_set(out, n=48, latent=8, teachers=((16, 16),))``.
Records hold ``moments`` (2C, L, L) = [mean | std] with std in [0, 0.1), ``label`` = key % num_classes and one
bf16 ``feat.<i>`` (T, D) per teacher, all drawn from ``torch.Generator().manual_seed(seed)`` in key order.
"""
from __future__ import annotations

import torch

from . import records as R
from .schema import FieldSpec
from .writer import ShardSetWriter, finalize_manifest

__all__ = ["synthetic_provenance", "write_synthetic_set"]


def synthetic_provenance(latent: int, channels: int, teachers: list[tuple[int, int]], num_classes: int,
                         vae_id: str | None = None, haste: dict | None = None,
                         teacher_meta: list[dict] | None = None) -> dict:
    """A manifest provenance shaped like the one repa-preprocess writes (docs/CONTRACTS.md)."""
    metas = teacher_meta or [{"name": f"test-teacher-{i}", "id": None, "tokens": t, "dim": d,
                              "grid": [int(t ** 0.5)] * 2, "codec": "bf16"} for i, (t, d) in enumerate(teachers)]
    for i, m in enumerate(metas):
        m["field"] = R.feat(i)
    return {"source": "synthetic", "resolution": latent * 8, "crop": "adm",
            "vae": {"id": vae_id, "latent_channels": channels, "downsample": 8,
                    "scale": [0.5] * channels, "bias": [0.1] * channels},
            "latent_size": latent, "teachers": metas, "num_classes": num_classes, "flip": False,
            "haste": haste, "skipped": [], "repa_version": "0.1.0"}


def write_synthetic_set(out: str, n: int = 48, *, latent: int = 8, channels: int = 4, teachers=((16, 16),),
                        num_classes: int = 10, records_per_shard: int = 16, seed: int = 0, extra_fields=None,
                        extra_data=None, storage_options: dict | None = None, **prov_kwargs) -> str:
    """Write ``n`` random records to ``out`` and its manifest; returns ``out``.

    ``extra_fields`` ({name: FieldSpec}) and ``extra_data(key, generator) -> {name: array}`` add fields.
    """
    g = torch.Generator().manual_seed(seed)
    fields = {R.MOMENTS: FieldSpec((2 * channels, latent, latent), "float32", "raw"),
              R.LABEL: FieldSpec((), "int64", "raw")}
    for i, (t, d) in enumerate(teachers):
        fields[R.feat(i)] = FieldSpec((t, d), "bfloat16", "bf16")
    fields.update(extra_fields or {})
    with ShardSetWriter(out, fields, records_per_shard=records_per_shard, storage_options=storage_options) as w:
        for key in range(n):
            sample = {R.MOMENTS: torch.cat([torch.randn(channels, latent, latent, generator=g),
                                            0.1 * torch.rand(channels, latent, latent, generator=g)]),
                      R.LABEL: torch.tensor(key % num_classes)}
            for i, (t, d) in enumerate(teachers):
                sample[R.feat(i)] = torch.randn(t, d, generator=g)
            if extra_data:
                sample.update(extra_data(key, g))
            w.write(key, sample)
    finalize_manifest(out, fields, synthetic_provenance(latent, channels, list(teachers), num_classes, **prov_kwargs),
                      expected_records=n, storage_options=storage_options)
    return out
