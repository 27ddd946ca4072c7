"""Benchmark: samples/s of repa-sample vs a reference-style generation loop, measured in one run.

Ours: ``sampler.sample_cli.main([...])`` called in-process on a small random SiT checkpoint folder (pixel space,
so no VAE download), including checkpoint loading, per-index noise, PNG writing, the npz, the JSON and the grid.
Reference-style loop: the reference generate.py's inner loop without any file writing: per batch
``z = randn(n, C, H, W); y = randint(K, (n,))``, the same sampler (same model, NFE, batch, CFG), the
``clamp(255 * (x + 1) / 2)`` uint8 conversion. The last line printed is one JSON object with ``vs_reference_loop``
= our samples/s over the loop's.

    .venv/bin/python bench/sampler.py [--num 64 --batch 16 --steps 10 --mode ode --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from safetensors.torch import save_file

from repa.sampler import euler_maruyama_sampler, euler_sampler
from repa.sampler.load import load_sampling_model
from repa.sampler.sample_cli import main as sample_main
from repa.trainer.models import SiT

SIDE = 16
MODEL = dict(input_size=SIDE, patch_size=2, in_channels=3, hidden_size=128, decoder_hidden_size=128, depth=4,
             num_heads=2, encoder_depth=2, num_classes=10, z_dims=[64], projector_dim=128, fused_attn=False,
             path_type="linear")


def make_checkpoint(root: str) -> str:
    torch.manual_seed(0)
    model = SiT(**MODEL)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    d = os.path.join(root, "checkpoints", "0000001")
    os.makedirs(d)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "ema.safetensors"))
    data = {"resolution": SIDE, "latent_size": SIDE, "num_classes": 10,
            "vae": {"id": None, "latent_channels": 3, "downsample": 1, "scale": [1.0] * 3, "bias": [0.0] * 3}}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model": {"name": "SiT-bench/2", "kwargs": MODEL}, "data": data, "step": 1}, f)
    return d


def reference_loop(model, num, batch, steps, cfg, mode) -> float:
    """The reference generate.py's inner loop (no file writes); returns seconds."""
    sampler = euler_maruyama_sampler if mode == "sde" else euler_sampler
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in range((num + batch - 1) // batch):
        z = torch.randn(batch, 3, SIDE, SIDE)
        y = torch.randint(0, MODEL["num_classes"], (batch,))
        x = sampler(model, z, y, num_steps=steps, cfg_scale=cfg, guidance_low=0.0, guidance_high=1.0).float()
        torch.clamp(255.0 * (x + 1) / 2, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--mode", choices=["ode", "sde"], default="ode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = tempfile.mkdtemp(prefix="repa-bench-sampler-")
    try:
        ckpt = make_checkpoint(root)
        model, _ = load_sampling_model(ckpt, fused_attn=False)
        euler_sampler(model, torch.randn(a.batch, 3, SIDE, SIDE), torch.zeros(a.batch, dtype=torch.long), num_steps=2,
                      cfg_scale=a.cfg)  # warm-up
        ref_num = ((a.num + a.batch - 1) // a.batch) * a.batch
        t_ref, t_ours = [], []
        for r in range(a.rounds):  # alternate, keep each side's best round (other load on the machine is noise)
            t_ref.append(reference_loop(model, a.num, a.batch, a.steps, a.cfg, a.mode))
            t0 = time.perf_counter()
            sample_main(["--ckpt", ckpt, "--sample-dir", os.path.join(root, f"samples{r}"), "--num-fid-samples",
                         str(a.num), "--per-proc-batch-size", str(a.batch), "--num-steps", str(a.steps),
                         "--cfg-scale", str(a.cfg), "--mode", a.mode, "--no-progress"])
            t_ours.append(time.perf_counter() - t0)
        t_ref, t_ours = min(t_ref), min(t_ours)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours, ref = a.num / t_ours, ref_num / t_ref
    print(f"reference-style loop: {ref_num} samples in {t_ref:.2f}s = {ref:.2f} samples/s (no writes)")
    print(f"repa-sample in-process: {a.num} samples in {t_ours:.2f}s = {ours:.2f} samples/s "
          f"(load + PNG + npz + JSON + grid included)")
    print(json.dumps({"bench": "sampler", "mode": a.mode, "num_samples": a.num, "batch": a.batch,
                      "num_steps": a.steps, "cfg_scale": a.cfg, "threads": a.threads, "rounds": a.rounds,
                      "ours_samples_per_s": round(ours, 3), "reference_loop_samples_per_s": round(ref, 3),
                      "vs_reference_loop": round(ours / ref, 3)}))


if __name__ == "__main__":
    main()
