"""The REPA record contract: field names, the latent convention, the provenance schema.

Every stage builds and parses these names through this module, so a field's name is written once:

- ``moments``            float32 (2C, H', W'): posterior mean in channels [0:C], std in [C:2C]
                         (docs/reference.md §3.2, §5.3). Pixel space (``--vae none``): mean = image, std = 0.
- ``label``              int64 () class index.
- ``feat.<i>``           teacher i's patch tokens (T, D) in the feature codec.
- ``moments_flip``, ``feat_flip.<i>``  optional: the same for the mirrored image (``--flip``).
- ``haste.<i>``          optional: teacher i's residual stream entering its first aligned block (HASTE).
- ``text.<k>``           optional (text-to-image): the k-th caption's text-encoder hidden states (L, D).
- ``num_captions``       optional (text-to-image): int64 () how many ``text.<k>`` slots hold a caption.

The latent convention: the trainer diffuses ``z = (mean + std * eps) * scale + bias`` and a decoder sees
``(z - bias) / scale`` (per channel; SD-VAEs have scale 0.18215 and bias 0, docs/reference.md §3.2).
"""
from __future__ import annotations

import re

import torch

MOMENTS = "moments"
MOMENTS_FLIP = "moments_flip"
LABEL = "label"
NUM_CAPTIONS = "num_captions"
KEY = "key"  # the global record index the reader adds to every batch

_INDEXED = re.compile(r"^(feat|feat_flip|haste|text)\.(\d+)$")

__all__ = ["MOMENTS", "MOMENTS_FLIP", "LABEL", "NUM_CAPTIONS", "KEY", "feat", "feat_flip", "haste", "text",
           "parse", "indexed", "teacher_fields", "text_fields", "latent_convention", "scale_latents",
           "unscale_latents", "sample_latents", "PROVENANCE_KEYS"]


def feat(i: int) -> str:
    """Teacher ``i``'s patch features."""
    return f"feat.{int(i)}"


def feat_flip(i: int) -> str:
    """Teacher ``i``'s features of the mirrored image."""
    return f"feat_flip.{int(i)}"


def haste(i: int) -> str:
    """Teacher ``i``'s cached residual stream (HASTE's partial forward starts from it)."""
    return f"haste.{int(i)}"


def text(k: int) -> str:
    """The ``k``-th caption's text-encoder hidden states."""
    return f"text.{int(k)}"


def parse(name: str) -> tuple[str, int | None]:
    """``"feat.3"`` -> ``("feat", 3)``; ``"moments"`` -> ``("moments", None)``."""
    m = _INDEXED.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def indexed(fields, kind: str) -> list[str]:
    """The ``kind.<i>`` names among ``fields``, in index order (``feat.10`` after ``feat.9``)."""
    found = [(i, n) for n in fields for k, i in [parse(n)] if k == kind and i is not None]
    return [n for _, n in sorted(found)]


def teacher_fields(fields) -> list[str]:
    """The teacher feature fields ``feat.<i>`` of a manifest's field dict, in teacher order."""
    return indexed(fields, "feat")


def text_fields(fields) -> list[str]:
    """The caption feature fields ``text.<k>``, in caption order."""
    return indexed(fields, "text")


def latent_convention(vae_provenance: dict | None, channels: int) -> tuple[list[float], list[float]]:
    """(scale, bias) per channel from the manifest's ``provenance["vae"]``; identity when absent."""
    vae = vae_provenance or {}
    scale = list(vae.get("scale") or [1.0] * channels)
    bias = list(vae.get("bias") or [0.0] * channels)
    if len(scale) != channels or len(bias) != channels:
        raise ValueError(f"provenance vae scale/bias have {len(scale)}/{len(bias)} entries for a {channels}-channel "
                         "latent: the shard set's manifest is inconsistent")
    return scale, bias


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def scale_latents(z: torch.Tensor, scale, bias) -> torch.Tensor:
    """VAE latent -> the diffusion model's latent: ``z * scale + bias``."""
    return z * _per_channel(scale, z).to(z.dtype) + _per_channel(bias, z).to(z.dtype)


def unscale_latents(z: torch.Tensor, scale, bias) -> torch.Tensor:
    """The diffusion model's latent -> what the VAE decoder takes: ``(z - bias) / scale``."""
    return (z - _per_channel(bias, z).to(z.dtype)) / _per_channel(scale, z).to(z.dtype)


def sample_latents(moments: torch.Tensor, scale, bias) -> torch.Tensor:
    """One posterior draw from stored moments, scaled: ``(mean + std * eps) * scale + bias``.

    ``eps`` comes from the default generator of the moments' device, as the official ``sample_posterior``
    (docs/reference.md §3.2, §3.3 step 2).
    """
    mean, std = moments.float().chunk(2, dim=1)
    return scale_latents(mean + std * torch.randn_like(mean), scale, bias)


# provenance keys a reader may rely on (writers may add more; readers ignore what they do not know)
PROVENANCE_KEYS = {
    "source": "the source spec, e.g. 'imagenet' or 'imagefolder:/data/x'",
    "resolution": "image side R in pixels",
    "crop": "'adm' (docs/reference.md §5.1)",
    "vae": "{'id', 'latent_channels', 'downsample', 'scale', 'bias'}",
    "latent_size": "H' = W' of the moments",
    "teachers": "one entry per feat.<i>: {'field', 'name', 'id', 'input_size', 'tokens', 'dim', 'grid', "
                "'preprocess', 'codec', 'prefix_tokens', 'depth', 'heads'}",
    "num_classes": "number of classes (the null class is num_classes)",
    "flip": "whether moments_flip / feat_flip.<i> are present",
    "haste": "null, or {'field', 'teacher', 'block', ...} for haste.<i>",
    "skipped": "[{'key', 'path', 'error'}] of images left out with --skip-bad",
    "repa_version": "the writer's version",
}
