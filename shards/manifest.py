"""manifest.json: the description of a shard set (schema version, fields, shards, provenance).

The trainer and the sampler read model dimensions (latent size, teacher tokens/dim) from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import storage
from .schema import SCHEMA_VERSION, FieldSpec, record_bytes

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """manifest.json (or a shard sidecar) is missing, unreadable or incompatible; the message names the file."""


@dataclass
class ShardInfo:
    """One finished shard: also stored as the sidecar ``<shard>.json`` next to it."""

    name: str
    num_records: int
    nbytes: int
    sha256: str
    first_key: int
    last_key: int
    # stored CRC-32 of the first and last record: lets the reader tell this shard from a same-size shard of
    # another set in O(1) (None for sets written before it was recorded)
    edge_crc: tuple[int, int] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.edge_crc is None:
            d.pop("edge_crc")
        else:
            d["edge_crc"] = [int(c) for c in self.edge_crc]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ShardInfo":
        name = str(d["name"])
        if not name or "/" in name or "\\" in name or name in (".", "..") or not name.endswith(".tar"):
            # a shard is a plain file next to manifest.json: never follow a name out of the shard set
            raise ValueError(f"shard name {name!r} is not a plain file name ending in .tar")
        edge = d.get("edge_crc")
        if edge is not None and (len(edge) != 2 or not all(isinstance(c, int) for c in edge)):
            raise ValueError(f"edge_crc {edge!r} is not two integers")
        return cls(name, int(d["num_records"]), int(d["nbytes"]), str(d["sha256"]),
                   int(d["first_key"]), int(d["last_key"]), tuple(edge) if edge is not None else None)


@dataclass
class Manifest:
    schema_version: int
    num_records: int
    fields: dict[str, FieldSpec]
    shards: list[ShardInfo]
    provenance: dict = field(default_factory=dict)
    record_bytes: int = 0

    def __post_init__(self):
        if not self.record_bytes:
            self.record_bytes = record_bytes(self.fields)

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "num_records": self.num_records,
            "record_bytes": self.record_bytes,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "shards": [s.to_json() for s in self.shards],
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema_version {version!r} is not supported by this repa (reads "
                                f"version {SCHEMA_VERSION}); re-run repa-preprocess or install a matching repa")
        try:
            fields = {k: FieldSpec.from_json(v) for k, v in d["fields"].items()}
            m = cls(SCHEMA_VERSION, int(d["num_records"]), fields,
                    [ShardInfo.from_json(s) for s in d["shards"]], dict(d.get("provenance") or {}),
                    int(d["record_bytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if m.record_bytes != record_bytes(fields):
            raise ManifestError(f"{where}: record_bytes {m.record_bytes} does not match the fields "
                                f"({record_bytes(fields)}); the file was edited or written by another tool")
        if sum(s.num_records for s in m.shards) != m.num_records:
            raise ManifestError(f"{where}: num_records {m.num_records} != sum of the shards' record counts")
        return m


def manifest_url(url: str) -> str:
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """Read ``<url>/manifest.json`` (url = shard-set directory/URL, or the manifest file itself)."""
    path = manifest_url(url)
    try:
        raw = storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; point at a shard set written by repa-preprocess "
                            "(a directory with manifest.json)") from None
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: invalid JSON ({e})") from None
    return Manifest.from_json(d, where=path)


def write_manifest(url: str, manifest: Manifest, storage_options: dict | None = None) -> None:
    """Atomically write ``<url>/manifest.json``."""
    data = json.dumps(manifest.to_json(), indent=1).encode()
    storage.write_bytes(manifest_url(url), data, storage_options)
