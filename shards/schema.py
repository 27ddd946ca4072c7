"""Record schema: field specs and the fixed-stride record layout inside a tar shard.

Every record is a run of tar members, one per field in manifest order, then ``crc``. Each member is a
512-byte ustar header followed by its data padded to 512 bytes. All fields have a fixed shape, dtype and
codec, so every record occupies exactly ``record_bytes(fields)`` and record ``i`` of a shard starts at byte
``i * record_bytes``: random access, range reads and exact resume need no index.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("repa shards store little-endian arrays and decode them zero-copy; big-endian hosts are not supported")

SCHEMA_VERSION = 1
BLOCK = 512
CRC_FIELD = "crc"

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
# codec -> stored dtype (None: the field's own dtype)
CODECS: dict[str, str | None] = {"raw": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": None}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# decoded dtype a feature codec gives by default (see feature_spec)
CODEC_DEFAULT_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}


def padded(n: int) -> int:
    """``n`` rounded up to a whole number of 512-byte tar blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


@dataclass(frozen=True)
class FieldSpec:
    """One fixed-size array per record.

    shape: decoded shape, e.g. (8, 32, 32) or (256, 768); () for a scalar such as the label.
    dtype: decoded dtype name (see DTYPES).
    codec: "raw" (stored as dtype) | "fp32" | "fp16" | "bf16" | "int8" (2-D (T, D) float features only;
           per-channel and per-token scales, see codecs.py).
    """

    shape: tuple[int, ...]
    dtype: str
    codec: str = "raw"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"FieldSpec: unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if self.codec not in CODECS:
            raise ValueError(f"FieldSpec: unknown codec {self.codec!r}; use one of {sorted(CODECS)}")
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"FieldSpec: shape {self.shape} must be positive")
        if self.codec != "raw" and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"FieldSpec: codec {self.codec!r} needs a float dtype, got {self.dtype!r}")
        if self.codec == "int8" and len(self.shape) != 2:
            raise ValueError(f"FieldSpec: codec 'int8' needs a 2-D (tokens, dim) shape, got {self.shape}")

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def stored_dtype(self) -> str:
        """dtype of the stored values (for int8: of the quantized values)."""
        if self.codec == "int8":
            return "int8"
        return CODECS[self.codec] or self.dtype

    @property
    def nbytes(self) -> int:
        """Encoded bytes of one value of this field."""
        if self.codec == "int8":
            t, d = self.shape
            return 4 * d + 4 * t + t * d
        return self.numel * DTYPES[self.stored_dtype][1]

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "codec": self.codec, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, d: dict) -> "FieldSpec":
        return cls(tuple(d["shape"]), d["dtype"], d.get("codec", "raw"))


def feature_spec(shape: tuple[int, ...], codec: str = "bf16") -> FieldSpec:
    """FieldSpec for teacher features with the codec's natural decoded dtype (bf16 -> bfloat16, int8 -> float32)."""
    if codec not in CODEC_DEFAULT_DTYPE:
        raise ValueError(f"--feature-codec {codec!r}: use one of {sorted(CODEC_DEFAULT_DTYPE)}")
    return FieldSpec(tuple(shape), CODEC_DEFAULT_DTYPE[codec], codec)


def check_field_name(name: str) -> None:
    """Field names are tar member extensions: no '/', not 'crc', short enough for a ustar name."""
    if not name or "/" in name or name.startswith(".") or name == CRC_FIELD or len(name) > 80 or not name.isascii():
        raise ValueError(f"field name {name!r} is not allowed (ascii, no '/', not 'crc', <= 80 chars)")


@dataclass(frozen=True)
class Member:
    """One tar member of a record: header at ``header_offset``, data at ``data_offset`` (record-relative)."""

    name: str
    header_offset: int
    data_offset: int
    nbytes: int


def record_layout(fields: dict[str, FieldSpec]) -> tuple[list[Member], int]:
    """Members of one record (fields in order, then crc) and the record's total byte size."""
    members, off = [], 0
    for name, spec in list(fields.items()) + [(CRC_FIELD, None)]:
        if spec is not None:
            check_field_name(name)
        n = 4 if spec is None else spec.nbytes
        members.append(Member(name, off, off + BLOCK, n))
        off += BLOCK + padded(n)
    return members, off


def record_bytes(fields: dict[str, FieldSpec]) -> int:
    """Fixed size in bytes of one record (all its tar members, headers and padding included)."""
    return record_layout(fields)[1]
