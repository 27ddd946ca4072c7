"""Field codecs: array <-> little-endian bytes, never pickle. One object per codec, one interface.

- ``raw``: the field's dtype as is.
- ``fp32`` / ``fp16`` / ``bf16``: stored in that precision (round-to-nearest-even), decoded by a zero-copy
  view; converted to the field's decoded dtype only if it differs from the stored one.
- ``int8`` (2-D (T, D) float features): per-record channel scales c_j = sqrt(max_t |x_tj|) (a SmoothQuant-
  style half equalisation that tames outlier channels such as DINOv2's), then per-token scales
  s_t = max_j |x_tj / c_j| / 127, q = round(x / (s_t c_j)). Bytes: D float32 c, T float32 s, T*D int8 q.
  Decoded x ~ q * s_t * c_j, vectorised over a whole batch.

A codec answers ``check(shape, dtype)``, ``stored_dtype(dtype)``, ``nbytes(shape, dtype)``, ``encode(t)`` and
``decode_batch(u8, shape, dtype)``; ``feature_dtype`` is the decoded dtype ``feature_spec`` gives it (None: not
offered for teacher features). Adding a codec is one class and one line in ``CODECS``.

``decode_batch`` works on a (B, nbytes) uint8 tensor (the reader's batch buffer); ``decode_field`` is the
single-record case of it.
"""
from __future__ import annotations

import numpy as np
import torch

# decoded dtype name -> (torch dtype, itemsize)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float64": (torch.float64, 8),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
    "int16": (torch.int16, 2),
    "int8": (torch.int8, 1),
    "uint8": (torch.uint8, 1),
    "bool": (torch.bool, 1),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _view(u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return u8.view(dtype)
    except RuntimeError:  # misaligned or strided slice: copy once into fresh row-major storage
        # (not .contiguous(): a (1, n) slice of a wider row counts as contiguous yet keeps the row stride)
        return torch.empty(u8.shape, dtype=u8.dtype).copy_(u8).view(dtype)


class Codec:
    """Store the values in ``store`` (a dtype name; None: the field's own dtype)."""

    def __init__(self, name: str, store: str | None, feature_dtype: str | None):
        self.name, self.store, self.feature_dtype = name, store, feature_dtype

    def check(self, shape: tuple[int, ...], dtype: str) -> None:
        if self.store is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"FieldSpec: codec {self.name!r} needs a float dtype, got {dtype!r}")

    def stored_dtype(self, dtype: str) -> str:
        return self.store or dtype

    def nbytes(self, shape: tuple[int, ...], dtype: str) -> int:
        return _numel(shape) * DTYPES[self.stored_dtype(dtype)][1]

    def encode(self, t: torch.Tensor, dtype: str) -> bytes:
        return _to_bytes(t.to(DTYPES[self.stored_dtype(dtype)][0]))

    def decode_batch(self, u8: torch.Tensor, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        x = _view(u8, DTYPES[self.stored_dtype(dtype)][0]).reshape(u8.shape[0], *shape)
        out = DTYPES[dtype][0]
        return x if x.dtype == out else x.to(out)

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


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


class Int8Tokens(Codec):
    """Per-record channel scales and per-token scales over int8 values (2-D (T, D) float features only)."""

    def __init__(self):
        super().__init__("int8", None, "float32")

    def check(self, shape, dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"FieldSpec: codec 'int8' needs a float dtype, got {dtype!r}")
        if len(shape) != 2:
            raise ValueError(f"FieldSpec: codec 'int8' needs a 2-D (tokens, dim) shape, got {shape}")

    def stored_dtype(self, dtype):
        return "int8"  # of the quantized values

    def nbytes(self, shape, dtype):
        t, d = shape
        return 4 * d + 4 * t + t * d

    def encode(self, t, dtype):
        c, s, q = quantize_int8(t)
        return _to_bytes(c) + _to_bytes(s) + _to_bytes(q)

    def decode_batch(self, u8, shape, dtype):
        t, d = shape
        c = _view(u8[:, : 4 * d], torch.float32)
        s = _view(u8[:, 4 * d: 4 * d + 4 * t], torch.float32)
        x = _view(u8[:, 4 * d + 4 * t:], torch.int8).reshape(u8.shape[0], t, d).to(torch.float32)
        x.mul_(s[:, :, None]).mul_(c[:, None, :])
        out = DTYPES[dtype][0]
        return x if out == torch.float32 else x.to(out)


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("raw", None, None),
    Codec("fp32", "float32", "float32"),
    Codec("fp16", "float16", "float16"),
    Codec("bf16", "bfloat16", "bfloat16"),
    Int8Tokens(),
)}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"FieldSpec: unknown codec {name!r}; use one of {sorted(CODECS)}")
    return CODECS[name]


def feature_codecs() -> tuple[str, ...]:
    """Codec names offered for teacher/text features (``--feature-codec``), default first."""
    names = [n for n, c in CODECS.items() if c.feature_dtype is not None]
    return tuple(sorted(names, key=lambda n: n != "bf16"))


def _as_tensor(array, spec) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(array)) if not isinstance(array, torch.Tensor) else array.detach().cpu()
    if tuple(t.shape) != spec.shape:
        raise ValueError(f"array of shape {tuple(t.shape)} does not match the field's shape {spec.shape}")
    if not t.dtype.is_floating_point and not t.dtype.is_complex and DTYPES[spec.dtype][0].is_floating_point:
        t = t.to(torch.float32)
    if t.dtype.is_floating_point and not DTYPES[spec.dtype][0].is_floating_point:
        raise ValueError(f"float array given for the integer field of dtype {spec.dtype}: cast it explicitly")
    return t


def encode_field(array, spec) -> bytes:
    """Encode one record's value of a field (numpy or torch, any device) to exactly ``spec.nbytes`` bytes."""
    out = get_codec(spec.codec).encode(_as_tensor(array, spec), spec.dtype)
    assert len(out) == spec.nbytes
    return out


def decode_batch(u8: torch.Tensor, spec) -> torch.Tensor:
    """Decode a (B, nbytes) uint8 tensor to (B, *shape) of ``spec.dtype``; a view where the codec allows."""
    return get_codec(spec.codec).decode_batch(u8, spec.shape, spec.dtype)


def decode_field(buf, spec) -> torch.Tensor:
    """Decode one record's bytes (bytes, bytearray, memoryview or uint8 array) to a tensor of ``spec.shape``."""
    mv = memoryview(buf).cast("B")
    if len(mv) != spec.nbytes:
        raise ValueError(f"decode_field: got {len(mv)} bytes, the field {spec} needs {spec.nbytes}")
    if mv.readonly:  # torch.frombuffer warns on read-only buffers; the decoded tensor is never written
        mv = memoryview(bytearray(mv))
    u8 = torch.frombuffer(mv, dtype=torch.uint8).reshape(1, -1)
    return decode_batch(u8, spec)[0]
