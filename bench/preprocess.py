"""Benchmark: end-to-end repa-preprocess throughput vs the models' forward-only ceiling, and bytes/record.

    .venv/bin/python bench/preprocess.py [--images 96] [--res 128] [--batch-size 16] [--num-workers 1]

Both numbers are measured in the same run on the same models (a small SD-VAE-architecture AutoencoderKL
and a small DINOv2-architecture ViT with random weights, loaded from local directories through the users'
code paths) and the same images (JPEGs of ImageNet-like sizes in an image folder):

- model_only: `Models` (VAE encode + teacher) on already decoded and cropped uint8 batches;
- end_to_end: `repa-preprocess` (pipeline.run) on the JPEG folder: decode + ADM crop in DataLoader workers,
  inference, encoding and tar writing; images / loop seconds (one-time model loading excluded, reported
  separately as wall seconds).

Target: of_model_only = end_to_end / model_only >= 0.85. Bytes/record are reported for every feature codec,
measured on the bench models and computed from the schema for the paper configuration (256 px, SD-VAE,
DINOv2-B). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image


def make_models(root: Path, res: int) -> tuple[str, str]:
    import timm
    from diffusers import AutoencoderKL
    from timm.models import save_for_hf
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=res)
    vae.save_pretrained(str(root / "vae"))
    args = dict(embed_dim=192, depth=6, num_heads=3, img_size=224)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **args)
    save_for_hf(vit, str(root / "teacher"), model_args=args, safe_serialization=True)
    return str(root / "vae"), f"timm:local-dir:{root / 'teacher'}"


def make_images(root: Path, n: int) -> Path:
    """JPEGs of ImageNet-like sizes (~500x375, quality 90) with smooth content, 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        d = root / "images" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.jpg", quality=90)
    return root / "images"


def model_only(opts, device, source, n: int) -> float:
    """images/s of VAE + teacher forward on already-decoded crops (same batch size, same models)."""
    from repa.preprocess.crop import adm_center_crop
    from repa.preprocess.pipeline import Models
    models = Models(opts, device)
    crops = [torch.from_numpy(adm_center_crop(source.decode(source.get(k))[0], opts.res)).permute(2, 0, 1)
             for k in range(n)]
    batches = [torch.stack(crops[i: i + opts.batch_size]) for i in range(0, n, opts.batch_size)]
    models(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches:
        models(b)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from repa.preprocess.pipeline import Options, run
    from repa.preprocess.sources import open_source
    from repa.shards import read_manifest, record_bytes
    from repa.shards.schema import FieldSpec, feature_spec

    root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        vae_dir, enc = make_models(root, args.res)
        img_dir = make_images(root, args.images)
        base = dict(source=f"imagefolder:{img_dir}", res=args.res, vae=vae_dir, enc_type=enc,
                    batch_size=args.batch_size, num_workers=args.num_workers, progress=False, shard_size=64)
        device = torch.device("cpu")
        src = open_source(base["source"])
        ceiling = model_only(Options(**base), device, src, args.images)

        t = time.perf_counter()
        s = run(Options(**base, out=str(root / "out_bf16")), echo=lambda m: None)
        wall = time.perf_counter() - t
        e2e = s["images_per_s"]
        ratio = e2e / ceiling
        print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} threads, "
              f"{args.num_workers} decode worker(s)")
        print(f"models: AutoencoderKL (32,64,128,128) + DINOv2-arch ViT (192x6) at {args.res}px, "
              f"batch {args.batch_size}, {args.images} JPEGs ~500x375")
        print(f"model_only : {ceiling:8.2f} images/s (forward on decoded crops)")
        print(f"end_to_end : {e2e:8.2f} images/s (repa-preprocess loop; {wall:.1f} s wall incl. model loading)")
        print(f"ratio      : {ratio:8.3f} (target >= 0.85)")

        per_codec = {}
        for codec in ("bf16", "fp16", "fp32", "int8"):
            if codec == "bf16":
                man = read_manifest(str(root / "out_bf16"))
            else:
                out = root / f"out_{codec}"
                run(Options(**{**base, "num_workers": 0}, out=str(out), feature_codec=codec, limit=16),
                    echo=lambda m: None)
                man = read_manifest(str(out))
            per_codec[codec] = man.record_bytes
        paper = {}
        for codec in per_codec:
            fields = {"moments": FieldSpec((8, 32, 32), "float32"), "label": FieldSpec((), "int64"),
                      "feat.0": feature_spec((256, 768), codec)}
            paper[codec] = record_bytes(fields)
        print("bytes/record  codec: bench models (measured) | 256px SD-VAE + DINOv2-B (schema)")
        for codec in per_codec:
            print(f"  {codec:5s} {per_codec[codec]:10d} | {paper[codec]:10d}")
        print(json.dumps({"of_model_only": round(ratio, 4), "end_to_end_images_per_s": round(e2e, 3),
                          "model_only_images_per_s": round(ceiling, 3), "bytes_per_record_bench": per_codec,
                          "bytes_per_record_256_dinov2b": paper, "images": args.images, "res": args.res,
                          "batch_size": args.batch_size, "num_workers": args.num_workers}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
