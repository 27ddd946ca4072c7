"""Field codecs: array <-> little-endian bytes, never pickle.

- ``raw``: the field's dtype as is.
- ``fp32`` / ``fp16`` / ``bf16``: stored in that precision (round-to-nearest-even), decoded by a zero-copy
  view; converted to the field's decoded dtype only if it differs from the stored one.
- ``int8`` (2-D (T, D) float features): per-record channel scales c_j = sqrt(max_t |x_tj|) (a SmoothQuant-
  style half equalisation that tames outlier channels such as DINOv2's), then per-token scales
  s_t = max_j |x_tj / c_j| / 127, q = round(x / (s_t c_j)). Bytes: D float32 c, T float32 s, T*D int8 q.
  Decoded x ~ q * s_t * c_j, vectorised over a whole batch.

``decode_batch`` works on a (B, nbytes) uint8 tensor (the reader's batch buffer); ``decode_field`` is the
single-record case of it.
"""
from __future__ import annotations

import numpy as np
import torch

from .schema import DTYPES, FieldSpec


def _as_tensor(array, spec: FieldSpec) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(array)) if not isinstance(array, torch.Tensor) else array.detach().cpu()
    if tuple(t.shape) != spec.shape:
        raise ValueError(f"array of shape {tuple(t.shape)} does not match the field's shape {spec.shape}")
    if not t.dtype.is_floating_point and not t.dtype.is_complex and DTYPES[spec.dtype][0].is_floating_point:
        t = t.to(torch.float32)
    if t.dtype.is_floating_point and not DTYPES[spec.dtype][0].is_floating_point:
        raise ValueError(f"float array given for the integer field of dtype {spec.dtype}: cast it explicitly")
    return t


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, D) float -> (channel scales (D,) f32, token scales (T,) f32, q (T, D) int8). See module doc."""
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("int8 codec: features contain NaN/inf; fix the teacher output or use --feature-codec fp32")
    cmax = x.abs().amax(dim=0)
    c = torch.where(cmax > 0, cmax.sqrt(), torch.ones_like(cmax))
    y = x / c
    s = y.abs().amax(dim=1) / 127.0
    q = torch.round(y / torch.where(s > 0, s, torch.ones_like(s))[:, None]).clamp_(-127, 127).to(torch.int8)
    return c, s, q


def encode_field(array, spec: FieldSpec) -> bytes:
    """Encode one record's value of a field (numpy or torch, any device) to exactly ``spec.nbytes`` bytes."""
    t = _as_tensor(array, spec)
    if spec.codec == "int8":
        c, s, q = quantize_int8(t)
        out = _to_bytes(c) + _to_bytes(s) + _to_bytes(q)
    else:
        out = _to_bytes(t.to(DTYPES[spec.stored_dtype][0]))
    assert len(out) == spec.nbytes
    return out


def decode_batch(u8: torch.Tensor, spec: FieldSpec) -> torch.Tensor:
    """Decode a (B, nbytes) uint8 tensor to (B, *shape) of ``spec.dtype``; a view where the codec allows."""
    b = u8.shape[0]
    out_dtype = DTYPES[spec.dtype][0]
    if spec.codec == "int8":
        t, d = spec.shape
        c = _view(u8[:, : 4 * d], torch.float32)
        s = _view(u8[:, 4 * d: 4 * d + 4 * t], torch.float32)
        q = _view(u8[:, 4 * d + 4 * t:], torch.int8).reshape(b, t, d)
        x = q.to(torch.float32)
        x.mul_(s[:, :, None]).mul_(c[:, None, :])
        return x if out_dtype == torch.float32 else x.to(out_dtype)
    x = _view(u8, DTYPES[spec.stored_dtype][0]).reshape(b, *spec.shape)
    return x if x.dtype == out_dtype else x.to(out_dtype)


def _view(u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return u8.view(dtype)
    except RuntimeError:  # misaligned or non-contiguous slice: copy once
        return u8.contiguous().view(dtype)


def decode_field(buf, spec: FieldSpec) -> torch.Tensor:
    """Decode one record's bytes (bytes, bytearray, memoryview or uint8 array) to a tensor of ``spec.shape``."""
    mv = memoryview(buf).cast("B")
    if len(mv) != spec.nbytes:
        raise ValueError(f"decode_field: got {len(mv)} bytes, the field {spec} needs {spec.nbytes}")
    if mv.readonly:  # torch.frombuffer warns on read-only buffers; the decoded tensor is never written
        mv = memoryview(bytearray(mv))
    u8 = torch.frombuffer(mv, dtype=torch.uint8).reshape(1, -1)
    return decode_batch(u8, spec)[0]
