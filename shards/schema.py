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

from . import codecs as _codecs

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("repa shards store little-endian arrays and decode them zero-copy; big-endian hosts are not supported")

SCHEMA_VERSION = 1
BLOCK = 512
CRC_FIELD = "crc"

# dtypes and codecs live in codecs.py (one codec object per name); re-exported here for readers of the schema
DTYPES, FLOAT_DTYPES = _codecs.DTYPES, _codecs.FLOAT_DTYPES


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
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"FieldSpec: shape {self.shape} must be positive")
        self.codec_impl.check(self.shape, self.dtype)

    @property
    def codec_impl(self) -> "_codecs.Codec":
        """The codec object (encode, decode_batch, nbytes, stored_dtype) this field is stored with."""
        return _codecs.get_codec(self.codec)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def stored_dtype(self) -> str:
        """dtype of the stored values (for int8: of the quantized values)."""
        return self.codec_impl.stored_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        """Encoded bytes of one value of this field."""
        return self.codec_impl.nbytes(self.shape, self.dtype)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "codec": self.codec, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, d: dict) -> "FieldSpec":
        return cls(tuple(d["shape"]), d["dtype"], d.get("codec", "raw"))


def feature_spec(shape: tuple[int, ...], codec: str = "bf16") -> FieldSpec:
    """FieldSpec for teacher features with the codec's natural decoded dtype (bf16 -> bfloat16, int8 -> float32)."""
    names = _codecs.feature_codecs()
    if codec not in names:
        raise ValueError(f"--feature-codec {codec!r}: use one of {list(names)}")
    return FieldSpec(tuple(shape), _codecs.get_codec(codec).feature_dtype, codec)


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
