"""repa-preprocess settings and work plan: the Options (the CLI flags), their validation, the fixed shard plan,
the distributed context and the device. Identical on every rank and on every rerun."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from repa.shards import dist as _dist
from repa.shards.codecs import feature_codecs

from .crop import check_resolution
from .resume import PreprocessError
from .sources import Source
from .stop import parse_signal

SKIP_DIR = "preprocess-skipped"
SHARD_PREFIX = "shard"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURE_CODECS = feature_codecs()  # the shards' codec registry (bf16 first)

def flag(default, help: str, **cli):
    """An Options field that is also a repa-preprocess flag: `--<name with dashes>`, its help text, and
    optional click settings (`choices`, `type`; booleans defaulting to True get a `--no-<name>` form)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class Options:
    """Everything repa-preprocess needs. Every field with help is a CLI flag (preprocess/cli.py builds the
    command line from these fields, so each flag and its default are written once, here). Fields named in
    `FINGERPRINT` fix the output (stored in preprocess.json)."""

    source: str
    res: int = flag(256, "ADM center-crop side (multiple of 16).")
    out: str | None = flag(None, "Output directory or object-store URL [default: shards/<source>-<res>].")
    data_dir: str | None = flag(None, "imagenet: local ILSVRC-2012 train folder (nXXXXXXXX/*.JPEG).")
    split: str = flag("train", "HF sources: split.")
    image_column: str | None = flag(None, "HF sources: image column [default: image or img].")
    label_column: str | None = flag(None, "HF sources: label column [default: label or fine_label].")
    caption_column: str | None = flag(None, "hf: sources: caption column (a string or a list of strings); makes "
                                      "the source a captioned (text-to-image) one, docs/t2i.md.")
    text_encoder: str | None = flag(None, "Captioned sources (coco:DIR, captions:DIR, hf: --caption-column): "
                                    "clip-vit-L | HF id | local CLIPTextModel folder [default: clip-vit-L].")
    max_captions: int | None = flag(None, "Captioned sources: text.<k> slots per record [default: 5, MS-COCO's].",
                                    type=int)
    caption_crop: str | None = flag(None, "Captioned sources: adm (default) or uvit (U-ViT's MS-COCO crop: central "
                                    "square + one Lanczos resize, as the official t2i features).",
                                    choices=("adm", "uvit"))
    streaming: bool | None = flag(None, "HF sources: stream instead of downloading [default: stream for imagenet "
                                  "only].", type=bool)
    num_classes: int | None = flag(None, "Override the number of classes.", type=int)
    vae: str = flag("ema", "ema | mse | none | HF repo id | local diffusers directory.")
    enc_type: str = flag("dinov2-vit-b", "Comma list of teachers (dinov2-vit-b, clip-vit-L, timm:NAME, ...) or "
                         "none.")
    precision: str = flag("auto", "Teacher autocast; auto = fp16 on CUDA (the reference), fp32 on CPU.",
                          choices=("auto", "fp32", "bf16", "fp16"))
    vae_precision: str = flag("fp32", "VAE autocast (the reference encodes in fp32).",
                              choices=("fp32", "bf16", "fp16"))
    feature_codec: str = flag("bf16", "Storage codec of teacher features.", choices=FEATURE_CODECS)
    flip: bool = flag(False, "Also store moments_flip / feat_flip.<i> of the mirrored image.")
    haste: bool = flag(False, "Also store haste.0: teacher 0's residual stream entering block 8.")
    shard_size: int = flag(1000, "Records per shard.")
    seed: int = flag(0, "Seed of the write-order permutation.")
    limit: int | None = flag(None, "Only the first N images (trials).", type=int)
    exif_transpose: bool = flag(True, "Apply the EXIF orientation (the reference ignores it).")
    skip_bad: bool = flag(False, "Skip unreadable images (reported, counted in the manifest).")
    batch_size: int = flag(64, "Images per model forward (per process).")
    num_workers: int | None = flag(None, "Decode workers per process [default: min(8, cpus)].", type=int)
    compile: bool = flag(False, "torch.compile the VAE encoder and teachers.")
    device: str | None = flag(None, "Device [default: cuda:<local rank> if available, else cpu].")
    storage_options: dict | None = flag(None, "JSON dict for fsspec (object stores), e.g. "
                                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'.",
                                        type=dict)
    progress: bool = flag(True, "Progress bar.")
    verify: bool = flag(True, "On a rerun, read every finished shard once (sha256 + each record's CRC) and "
                        "rewrite those that fail; --no-verify checks only size, first/last records (O(1)).")
    requeue_signal: str | None = flag("USR1", "Signal that, like SIGTERM/SIGINT, stops the run cleanly (exit 0, "
                                      "rerun to resume); none to disable (SLURM: --signal=B:USR1@120).")
    # test hook (not a flag): called with the shard index after each shard is closed
    on_shard_done: Callable[[int], None] | None = field(default=None, repr=False, compare=False)


FINGERPRINT = ("source", "res", "data_dir", "split", "image_column", "label_column", "streaming",
               "num_classes", "vae", "enc_type", "precision", "vae_precision", "feature_codec", "flip",
               "haste", "shard_size", "seed", "limit", "exif_transpose")
# recorded only when set, so the settings of runs made before these flags existed still match
TEXT_FINGERPRINT = ("caption_column", "text_encoder", "max_captions", "caption_crop")


def default_out(source: Source, res: int) -> str:
    """`shards/<source>-<res>`: `repa-train --shards shards/` finds it."""
    return os.path.join("shards", f"{source.name}-{res}")


def shard_name(j: int) -> str:
    return f"{SHARD_PREFIX}-{j:06d}.tar"


def shard_plan(n: int, shard_size: int, *, shuffle: bool, seed: int) -> list[np.ndarray]:
    """Global keys of every shard, in write order: a seeded permutation (or identity) cut into chunks."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[i: i + shard_size] for i in range(0, n, shard_size)]


# ----------------------------------------------------------------------------------------------------------
# distributed context

# one distributed context for every stage (repa.shards.dist); ranks finish their shards at different times,
# so its default process-group timeout (24 h) lets the final barrier wait for hours
Dist = _dist.DistContext


def init_dist() -> Dist:
    """RANK/WORLD_SIZE from torchrun or `accelerate launch`; start a process group when world > 1."""
    return _dist.init()


def _settings(opts: Options) -> dict:
    d = {k: getattr(opts, k) for k in FINGERPRINT}
    d.update({k: getattr(opts, k) for k in TEXT_FINGERPRINT if getattr(opts, k) is not None})
    if d["data_dir"]:
        d["data_dir"] = os.path.abspath(d["data_dir"])
    return d


def _resolve(opts: Options, device: torch.device) -> Options:
    opts = dataclasses.replace(opts)
    opts.res = check_resolution(opts.res)
    if opts.precision == "auto":
        opts.precision = "fp16" if device.type == "cuda" else "fp32"
    for flag, v in (("--precision", opts.precision), ("--vae-precision", opts.vae_precision)):
        if v not in PRECISIONS:
            raise PreprocessError(f"{flag} must be one of fp32, bf16, fp16 (or auto), got {v!r}")
    if opts.feature_codec not in FEATURE_CODECS:
        raise PreprocessError(f"--feature-codec must be one of {', '.join(FEATURE_CODECS)}, got {opts.feature_codec!r}")
    if opts.shard_size < 1 or opts.batch_size < 1:
        raise PreprocessError("--shard-size and --batch-size must be >= 1")
    if opts.limit is not None and opts.limit < 1:
        raise PreprocessError("--limit must be >= 1")
    parse_signal(opts.requeue_signal)
    return opts


def _device(opts: Options, dist: Dist) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")
