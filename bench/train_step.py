"""Training-step benchmark: our cached-shard step vs the reference-style step, loop overhead, HASTE phase I.

One run, same SiT, same batch, same threads, each variant in its own subprocess (so its peak RSS is its own):
  bare        forward + backward + AdamW step of the SiT on a batch already in memory (no data, clip, EMA, logs)
  ours        repa-train's real loop (trainer.train.train) streaming the shard set: posterior sample, REPA loss,
              clip, AdamW, EMA, metrics.jsonl -- per-step wall time from its metrics.jsonl
  reference   REPA train.py style: decode B PNGs with PIL + load moments .npy, run a DINOv2-B-sized teacher
              (timm vit_base_patch14_dinov2, random weights, 224 input) every step, then the same step
  haste       repa-train phase I of HASTE: the teacher's last 4 blocks run online on the cached residual
  haste_ref   HASTE train.py style: PNG decode + the whole teacher online (with attention logits) every step
Every non-bare variant also times a bare step right after itself in the same process; the ratios use the median
over rounds of step/bare, so a busy shared machine slowing one process down cancels out.
Prints a table, then as the LAST line one JSON object with vs_reference_step = ours/reference,
loop_overhead = ours/bare - 1, haste_vs_repa = haste/ours, haste_vs_full_teacher = haste/haste_ref, and the
peak RSS of each variant in MiB.

    python bench/train_step.py                # SiT-S/2 shapes at 256 px (latent 32x32, 256 tokens), batch 2, 1 thread
    python bench/train_step.py --hidden 768 --heads 12   # SiT-B/2 shapes (slow on CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("bare", "ours", "reference", "haste", "haste_ref")


def model_kwargs(a) -> dict:
    return {"depth": a.depth, "hidden_size": a.hidden, "num_heads": a.heads}


# ---------------------------------------------------------------- data set-up (parent process)

def prepare(a, work: str) -> None:
    """Shard sets (REPA and HASTE), PNG + .npy reference data, and a random-weight DINOv2-B teacher dir."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from timm.models import save_for_hf

    from repa.shards import FieldSpec
    from repa.shards.synthetic import write_synthetic_set as write_shards

    torch.manual_seed(0)
    teacher_dir = os.path.join(work, "dinov2_b_random")
    args = dict(img_size=224)
    save_for_hf(timm.create_model("vit_base_patch14_dinov2", pretrained=False, **args), teacher_dir,
                model_args=args, safe_serialization=True)
    n = a.batch * (a.steps + a.warmup + 2)
    meta = [{"name": f"timm:local-dir:{teacher_dir}", "id": None, "tokens": 256, "dim": 768, "grid": [16, 16],
             "depth": 12, "heads": 12, "prefix_tokens": 1, "codec": "bf16"}]
    write_shards(os.path.join(work, "repa"), n=n, latent=32, teachers=((256, 768),), num_classes=1000,
                 records_per_shard=64, teacher_meta=[dict(m) for m in meta])
    write_shards(os.path.join(work, "haste"), n=n, latent=32, teachers=((256, 768),), num_classes=1000,
                 records_per_shard=64, teacher_meta=[dict(m) for m in meta],
                 haste={"teacher": 0, "start_block": 8, "attn_blocks": [8, 9, 10, 11]},
                 extra_fields={"haste.0": FieldSpec((257, 768), "float16", "fp16")},
                 extra_data=lambda key, g: {"haste.0": torch.randn(257, 768, generator=g)})
    ref = os.path.join(work, "ref")
    os.makedirs(ref, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # like REPA's dataset_tools convert: uncompressed PNG + mean/std moments .npy
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            os.path.join(ref, f"img{i:08d}.png"), compress_level=0)
        np.save(os.path.join(ref, f"img-mean-std-{i:08d}.npy"), rng.standard_normal((8, 32, 32), dtype=np.float32))


# ---------------------------------------------------------------- variants (child process)

def run_variant(a, work: str, variant: str) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    step_s = ours_step(a, work, variant) if variant in ("ours", "haste") else manual_step(a, work, variant)
    res = {"step_s": step_s}
    if variant != "bare":  # a bare step right after, in the same process: a drift-free ratio to bare
        res["bare_s"] = manual_step(a, work, "bare")
    return res


def ours_step(a, work: str, variant: str) -> float:
    """Median per-step wall time of the real loop, from the timestamps in its metrics.jsonl."""
    from repa.trainer.metrics import read_jsonl
    from repa.trainer.train import TrainConfig, train
    out = os.path.join(work, "runs")
    name = f"{variant}-{time.time_ns()}"
    train(TrainConfig(shards=os.path.join(work, "repa" if variant == "ours" else "haste"), output_dir=out,
                      exp_name=name, model="SiT-S/2", model_kwargs=model_kwargs(a), encoder_depth=4,
                      batch_size=a.batch, max_train_steps=a.warmup + a.steps, checkpointing_steps=10**9,
                      mixed_precision="no", num_workers=0, sampling_steps=0, early_stop_point=10**9))
    t = [r["time"] for r in read_jsonl(os.path.join(out, name, "metrics.jsonl"))]
    return statistics.median(b - c for b, c in zip(t[a.warmup:], t[a.warmup - 1:]))


def manual_step(a, work: str, variant: str) -> float:
    """bare / reference / haste_ref steps written out, around the same SiT, loss and optimizer."""
    import numpy as np
    import torch
    from PIL import Image

    from repa.preprocess.teachers import load_teacher
    from repa.trainer.ema import make_ema, update_ema
    from repa.trainer.haste import attention_alignment_loss, default_haste_config
    from repa.trainer.loss import REPALoss
    from repa.trainer.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=32, z_dims=[768], encoder_depth=4, **model_kwargs(a)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    loss_fn = REPALoss()
    B = a.batch
    if variant == "bare":
        x0, y, feat = torch.randn(B, 4, 32, 32), torch.randint(1000, (B,)), torch.randn(B, 256, 768)

        def step():
            denoise, proj = loss_fn(model, x0, y, [feat])
            (denoise.mean() + 0.5 * proj).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        ema = make_ema(model)
        teacher = load_teacher(f"timm:local-dir:{os.path.join(work, 'dinov2_b_random')}", 256).eval()
        haste = default_haste_config(4, a.heads, 12, 12, teacher_blocks=(8, 9, 10, 11))
        ref = os.path.join(work, "ref")
        n = len([f for f in os.listdir(ref) if f.endswith(".png")])
        order = iter(np.random.default_rng(0).permutation(n).tolist() * 10)
        scale = 0.18215

        def step():
            idx = [next(order) for _ in range(B)]
            images = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(ref, f"img{i:08d}.png")).convert("RGB"))
                                                for i in idx])).permute(0, 3, 1, 2).contiguous()
            moments = torch.from_numpy(np.stack([np.load(os.path.join(ref, f"img-mean-std-{i:08d}.npy")) for i in idx]))
            mean, std = moments.chunk(2, dim=1)
            x0 = (mean + std * torch.randn_like(mean)) * scale
            y = torch.randint(1000, (B,))
            with torch.no_grad():
                if variant == "reference":
                    feats, t_attn = teacher(images), None
                else:  # the whole teacher online, with the attention logits of blocks 8-11
                    feats, t_attn = teacher.forward_from(teacher.residual_before(images, 0), 0, haste.teacher_blocks)
            out = loss_fn(model, x0, y, [feats], return_attn=t_attn is not None)
            loss = out[0].mean() + 0.5 * out[1]
            if t_attn is not None:
                loss = loss + 0.5 * attention_alignment_loss(out[2], t_attn, haste.student_blocks, None, haste.heads)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model)

    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- driver

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every variant (1: stable timings on a shared machine)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the fastest is kept")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default=None, help="reuse a prepared directory")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.variant:
        res = run_variant(a, a.work, a.variant)
        res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return
    work = a.work or tempfile.mkdtemp(prefix="repa_bench_")
    if not os.path.exists(os.path.join(work, "repa", "manifest.json")):
        t0 = time.time()
        prepare(a, work)
        print(f"prepared {work} in {time.time() - t0:.0f}s", flush=True)
    results = {}
    base = [sys.executable, os.path.abspath(__file__), "--work", work] + [
        f"--{k}={getattr(a, k)}" for k in ("batch", "depth", "hidden", "heads", "steps", "warmup", "threads")]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    rel = {}  # variant -> [step / bare step timed right after it in the same process], one per round
    for r in range(a.rounds):  # variants interleaved, so slow phases of a shared machine hit all of them
        for v in a.variants.split(","):
            proc = subprocess.run(base + ["--variant", v], env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"variant {v} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(line[-1][len("RESULT "):])
            ratio = res["step_s"] / res.get("bare_s", res["step_s"])
            rel.setdefault(v, []).append(ratio)
            print(f"round {r} {v:10s} step {res['step_s'] * 1000:9.1f} ms  ({ratio:.3f} x bare)  "
                  f"peak RSS {res['rss_mib']:7.0f} MiB", flush=True)
            best = results.setdefault(v, res)
            best["step_s"] = min(best["step_s"], res["step_s"])
            best["rss_mib"] = max(best["rss_mib"], res["rss_mib"])
    step = {k: statistics.median(v) for k, v in rel.items()}  # in units of the bare step
    summary = {"sit": f"SiT depth {a.depth} hidden {a.hidden} heads {a.heads}, 256 tokens", "batch": a.batch,
               "threads": a.threads, "rounds": a.rounds,
               "best_step_ms": {k: round(r["step_s"] * 1000, 1) for k, r in results.items()},
               "step_vs_bare_median": {k: round(v, 3) for k, v in step.items()},
               "peak_rss_mib": {k: round(r["rss_mib"]) for k, r in results.items()}}
    if "ours" in step and "reference" in step:
        summary["vs_reference_step"] = round(step["ours"] / step["reference"], 3)
    if "ours" in step and "bare" in step:
        summary["loop_overhead"] = round(step["ours"] / step["bare"] - 1, 3)
    if "haste" in step and "ours" in step:
        summary["haste_vs_repa"] = round(step["haste"] / step["ours"], 3)
    if "haste" in step and "haste_ref" in step:
        summary["haste_vs_full_teacher"] = round(step["haste"] / step["haste_ref"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
