"""repa shard format: fixed-stride WebDataset-compatible tar shards of VAE moments + teacher features.

See docs/CONTRACTS.md (the interface) and README.md (The shard format) (the format and guarantees).
"""
from .codecs import decode_batch, decode_field, encode_field
from .manifest import Manifest, ManifestError, ShardInfo, read_manifest, write_manifest
from .schema import SCHEMA_VERSION, FieldSpec, feature_spec, record_bytes
from .storage import StorageError
from .writer import ShardSetWriter, ShardWriter, cleanup_stale_uploads, completed_shards, finalize_manifest

__all__ = [
    "SCHEMA_VERSION", "FieldSpec", "feature_spec", "record_bytes", "encode_field", "decode_field", "decode_batch",
    "Manifest", "ManifestError", "ShardInfo", "read_manifest", "write_manifest",
    "ShardWriter", "ShardSetWriter", "completed_shards", "finalize_manifest", "StorageError", "cleanup_stale_uploads",
]
from .reader import ShardError, ShardLoader, ShardStream, make_loader  # noqa: E402

__all__ += ["ShardStream", "ShardLoader", "ShardError", "make_loader"]
