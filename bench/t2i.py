"""Text-to-image cost: bytes per record with/without caption features, and the MMDiT vs SiT training step.

1. Bytes per record (exact: records have a fixed stride, shards/schema.py) for MS-COCO 256 shards:
   moments (8, 32, 32) fp32 + label + DINOv2-B feat.0 (256, 768) bf16, without text and with
   ``--max-captions`` CLIP ViT-L/14 slots (77, 768) + num_captions, per feature codec.
2. One REPA training step (forward + backward + AdamW on a batch in memory, REPALoss, 1 teacher) of
   MMDiT(depth D) and of a SiT with the same width, depth and heads (hidden 32·D, D heads), same latent size
   and batch; rounds alternate the two models in the same process and the ratio is the median of per-round
   ratios, so a busy shared machine slowing both cancels out.

    python bench/t2i.py                     # depth 4 (hidden 128), latent 16, batch 4, 77 context tokens, 1 thread
    python bench/t2i.py --depth 24 --latent 32 --batch 32 --device cuda   # the official MMDiT-B/2 vs SiT-B-width
Prints a table, then as the LAST line one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from repa.shards.schema import FieldSpec, feature_spec, record_bytes
from repa.trainer.loss import REPALoss
from repa.trainer.mmdit import ContextAsLabels, MMDiT
from repa.trainer.models import SiT


def bytes_per_record(max_captions: int) -> dict:
    base = {"moments": FieldSpec((8, 32, 32), "float32"), "label": FieldSpec((), "int64"),
            "feat.0": feature_spec((256, 768), "bf16")}
    out = {"no_text": record_bytes(base)}
    for codec in ("bf16", "fp16", "int8", "fp32"):
        fields = dict(base, **{f"text.{i}": feature_spec((77, 768), codec) for i in range(max_captions)},
                      num_captions=FieldSpec((), "int64"))
        out[f"text_{codec}"] = record_bytes(fields)
    return out


def _step(model, opt, loss_fn, x0, cond, zs):
    t0 = time.perf_counter()
    denoise, proj = loss_fn(model, x0, cond, zs)
    (denoise.mean() + 0.5 * proj).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if x0.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_times(a) -> dict:
    dev = torch.device(a.device)
    torch.manual_seed(0)
    hidden = 32 * a.depth
    mmdit = MMDiT(input_size=a.latent, depth=a.depth, encoder_depth=min(8, a.depth), z_dims=[768]).to(dev)
    sit = SiT(input_size=a.latent, depth=a.depth, hidden_size=hidden, num_heads=a.depth,
              encoder_depth=min(8, a.depth), z_dims=[768], num_classes=1000).to(dev)
    tokens = (a.latent // 2) ** 2
    x0 = torch.randn(a.batch, 4, a.latent, a.latent, device=dev)
    zs = [torch.randn(a.batch, tokens, 768, device=dev)]
    ctx = torch.randn(a.batch, a.context_tokens, 768, device=dev)
    labels = torch.randint(1000, (a.batch,), device=dev)
    runs = {"mmdit": (ContextAsLabels(mmdit), torch.optim.AdamW(mmdit.parameters(), lr=1e-4), ctx),
            "sit": (sit, torch.optim.AdamW(sit.parameters(), lr=1e-4), labels)}
    loss_fn = REPALoss()
    times = {k: [] for k in runs}
    for r in range(a.warmup + a.rounds):
        for name, (model, opt, cond) in runs.items():
            dt = _step(model, opt, loss_fn, x0, cond, zs)
            if r >= a.warmup:
                times[name].append(dt)
    ratio = statistics.median(m / s for m, s in zip(times["mmdit"], times["sit"]))
    return {"mmdit_step_s": statistics.median(times["mmdit"]), "sit_step_s": statistics.median(times["sit"]),
            "mmdit_vs_sit_step": ratio, "mmdit_params": sum(p.numel() for p in mmdit.parameters()),
            "sit_params": sum(p.numel() for p in sit.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context-tokens", type=int, default=77)
    p.add_argument("--max-captions", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sizes = bytes_per_record(a.max_captions)
    for k, v in sizes.items():
        print(f"bytes/record {k:>10}: {v:>9,} ({v / sizes['no_text']:.2f}x)")
    steps = step_times(a)
    print(f"step: MMDiT {steps['mmdit_step_s'] * 1e3:.1f} ms ({steps['mmdit_params']:,} params) vs SiT "
          f"{steps['sit_step_s'] * 1e3:.1f} ms ({steps['sit_params']:,} params): ratio {steps['mmdit_vs_sit_step']:.2f}")
    print(json.dumps({"bytes_per_record": sizes, **steps, "args": vars(a)}))


if __name__ == "__main__":
    main()
