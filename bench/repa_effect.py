"""Does representation alignment speed up training? REPA vs vanilla SiT on the embedded digits.

    python bench/repa_effect.py                 # ~30 min on 2 CPU cores; last line: {"steps_ratio": ...}

Protocol (everything through the project's own code):

1. teacher: the demo's pretrained ViT (`preprocess.demo_teacher.ensure_teacher`, cached);
2. data: `repa-preprocess digits --res 32 --vae none --enc-type timm:local-dir:<teacher>` (pixel space);
3. training: `trainer.train.train` (the loop behind `repa-train`) of the same small SiT, same flags, same
   seeds, with `--proj-coeff 0.5` (REPA) and `--proj-coeff 0` (vanilla), checkpoints every `--eval-every`;
4. sampling: every checkpoint's EMA weights (`sampler.load.load_sampling_model`) draw the same class-balanced
   samples from the same initial noise (`sampler.generate.initial_noise`) with `sampler.euler_sampler`, decoded
   and quantised by the sampler's `LatentDecoder`;
5. judging: `bench.digits_judge` (a convnet trained on the other half of the digits than the teacher, no
   teacher involved): Frechet distance of its features to the real digits (FD, lower is better) and the
   accuracy of the samples' requested classes (acc);
6. result: the mean curves over seeds, and steps_ratio = vanilla steps / REPA steps to reach the vanilla run's
   final FD (linear interpolation between checkpoints). If REPA never reaches it, the ratio is
   (vanilla steps to reach REPA's final FD) / final steps, i.e. < 1. The same for acc goes in `acc_steps_ratio`.

Outputs go to --out (results.json, curves PNG); `--img` also copies the PNG (e.g. docs/img/).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # python bench/repa_effect.py from anywhere
    sys.path.insert(0, ROOT)

from bench.digits_judge import load_or_train_judge  # noqa: E402

# The demo's student (scripts/demo.sh uses the same values): SiT with 4 blocks of width 64 on 32x32 RGB
# pixels, patch 4 -> an 8x8 token grid; REPA taps block 2. The teacher's 2x2 token grid is resampled to it.
MODEL = "SiT-S/4"
MODEL_KWARGS = {"hidden_size": 64, "depth": 4, "num_heads": 4, "projector_dim": 256}
TRAIN_FLAGS = dict(encoder_depth=2, batch_size=32, learning_rate=1e-3, ema_decay=0.995, mixed_precision="no",
                   num_workers=1, sampling_steps=0, cfg_prob=0.1)
RESOLUTION = 32


def log(msg: str) -> None:
    print(f"[repa_effect {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ curves -> steps ratio

def steps_to_reach(steps, values, target: float, higher_is_better: bool = False) -> float | None:
    """First step at which the piecewise-linear curve (steps, values) reaches ``target``; None if never.

    Reaching it already at the first checkpoint returns that step (an upper bound on the true crossing)."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64) * (-1.0 if higher_is_better else 1.0)
    t = -target if higher_is_better else target
    if v[0] <= t:
        return float(s[0])
    for i in range(1, len(s)):
        if v[i] <= t:
            frac = (v[i - 1] - t) / (v[i - 1] - v[i])
            return float(s[i - 1] + frac * (s[i] - s[i - 1]))
    return None


def steps_ratio(steps, vanilla, repa, higher_is_better: bool = False) -> dict:
    """vanilla steps / REPA steps to the same quality (see the module docstring)."""
    final = float(steps[-1])
    s_repa = steps_to_reach(steps, repa, vanilla[-1], higher_is_better)
    if s_repa is not None:
        return {"ratio": final / s_repa, "target": float(vanilla[-1]), "repa_steps": s_repa,
                "vanilla_steps": final, "lower_bound": s_repa == float(steps[0]), "direction": "repa reaches vanilla"}
    s_van = steps_to_reach(steps, vanilla, repa[-1], higher_is_better)
    return {"ratio": (s_van / final) if s_van is not None else None, "target": float(repa[-1]),
            "repa_steps": final, "vanilla_steps": s_van, "lower_bound": False,
            "direction": "vanilla reaches repa (REPA is slower)"}


# ------------------------------------------------------------------ stages

def make_shards(teacher: str, out: str) -> str:
    """repa-preprocess the digits with the teacher (reused when the shard set is complete)."""
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    cmd = [sys.executable, "-m", "repa.preprocess.cli", "digits", "--res", str(RESOLUTION), "--vae", "none",
           "--enc-type", f"timm:local-dir:{teacher}", "--out", out, "--num-workers", "1", "--no-progress"]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def train_run(shards: str, out_dir: str, name: str, proj_coeff: float, seed: int, steps: int,
              eval_every: int) -> str:
    """One training run through the trainer's loop (resumes/skips if already complete); returns its exp dir."""
    from repa.trainer.train import TrainConfig, train

    exp = os.path.join(out_dir, name)
    final = os.path.join(exp, "checkpoints", f"{steps:07d}")
    if os.path.isdir(final):
        return exp
    cfg = TrainConfig(shards=shards, output_dir=out_dir, exp_name=name, model=MODEL, model_kwargs=dict(MODEL_KWARGS),
                      proj_coeff=proj_coeff, seed=seed, max_train_steps=steps, checkpointing_steps=eval_every,
                      resume="auto", **TRAIN_FLAGS)
    t0 = time.perf_counter()
    train(cfg)
    log(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f} s")
    return exp


@torch.no_grad()
def sample_checkpoint(ckpt: str, num: int, num_steps: int, cfg_scale: float, seed: int = 0):
    """Class-balanced samples of a checkpoint's EMA weights: uint8 (N, 3, R, R) and their labels."""
    from repa.preprocess.vae import load_vae
    from repa.sampler import euler_sampler
    from repa.sampler.generate import LatentDecoder, initial_noise, make_labels
    from repa.sampler.load import load_sampling_model

    model, config = load_sampling_model(ckpt, weights="ema", device="cpu")
    kw = config["model"]["kwargs"]
    vae = config["data"]["vae"]
    decoder = LatentDecoder(load_vae("none"), vae["scale"], vae["bias"], "cpu")
    labels = torch.from_numpy(make_labels(num, seed, kw["num_classes"], label_sampling="balanced"))
    z = initial_noise(range(num), seed, [kw["in_channels"], kw["input_size"], kw["input_size"]])
    x = euler_sampler(model, z, labels, num_steps=num_steps, cfg_scale=cfg_scale)
    images = torch.from_numpy(decoder(x.float())).permute(0, 3, 1, 2).contiguous()
    return images, labels


def evaluate_run(exp: str, judge, num: int, num_steps: int, cfg_scale: float) -> list[dict]:
    """Judge every checkpoint of a run (cached in <exp>/judged.json)."""
    cache = os.path.join(exp, "judged.json")
    done = {}
    if os.path.isfile(cache):
        with open(cache) as f:
            done = {r["step"]: r for r in json.load(f)}
    root = os.path.join(exp, "checkpoints")
    rows = []
    for name in sorted(os.listdir(root)):
        if not name.isdigit():
            continue
        step = int(name)
        if step not in done:
            images, labels = sample_checkpoint(os.path.join(root, name), num, num_steps, cfg_scale)
            done[step] = {"step": step, **judge.score(images, labels)}
        rows.append(done[step])
    with open(cache, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def final_losses(exp: str, last: int = 50) -> dict:
    """Mean denoising and alignment losses over the last ``last`` logged steps."""
    with open(os.path.join(exp, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    tail = recs[-last:]
    return {"loss": float(np.mean([r["loss"] for r in tail])), "proj_loss": float(np.mean([r["proj_loss"] for r in tail])),
            "steps_per_s": float(np.median([r["steps_per_s"] for r in recs]))}


def plot(curves: dict, ratio: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"vanilla": "tab:gray", "repa": "tab:red"}
    for ax, key, title in ((axes[0], "fd", "Frechet distance to real digits (judge features), lower is better"),
                           (axes[1], "acc", "class accuracy of samples (judge), higher is better")):
        for arm in ("vanilla", "repa"):
            steps = np.asarray(curves[arm]["steps"])
            vals = np.asarray(curves[arm][key])  # (seeds, checkpoints)
            mean, std = vals.mean(0), vals.std(0)
            label = "SiT + REPA (proj-coeff 0.5)" if arm == "repa" else "SiT (proj-coeff 0)"
            ax.plot(steps, mean, "o-", color=colors[arm], label=label, ms=3)
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    van_final = np.asarray(curves["vanilla"]["fd"]).mean(0)[-1]
    axes[0].axhline(van_final, color="tab:gray", ls=":", lw=1)
    if ratio.get("ratio") and ratio["direction"] == "repa reaches vanilla":
        axes[0].axvline(ratio["repa_steps"], color="tab:red", ls=":", lw=1)
    r = ratio.get("ratio")
    axes[0].legend(fontsize=8, title=f"steps ratio {r:.2f}x" if r else "steps ratio n/a", title_fontsize=8)
    fig.suptitle(f"REPA vs vanilla SiT on digits, mean +- std over {len(curves['repa']['fd'])} seeds", fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "repa_effect"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=400, help="checkpoint (and judge) every N steps")
    p.add_argument("--num-samples", type=int, default=200, help="class-balanced samples per checkpoint")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler ODE steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance (measures the model itself)")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--teacher-cache", default=None, help="[default: $REPA_CACHE or ~/.cache/repa]")
    p.add_argument("--img", default=None, help="also copy the curves PNG here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    from repa.preprocess.demo_teacher import INFO_FILE, ensure_teacher
    teacher = ensure_teacher(args.teacher_cache, log=log)
    with open(os.path.join(teacher, INFO_FILE)) as f:
        teacher_info = json.load(f)
    shards = make_shards(teacher, os.path.join(args.out, "shards"))
    judge, judge_info = load_or_train_judge(os.path.join(args.out, "judge"), RESOLUTION, log=log)

    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {"repa": args.proj_coeff, "vanilla": 0.0}
    curves = {arm: {"steps": None, "fd": [], "acc": []} for arm in arms}
    runs = []
    for seed in seeds:
        for arm, coeff in arms.items():
            name = f"{arm}-seed{seed}"
            exp = train_run(shards, os.path.join(args.out, "exps"), name, coeff, seed, args.steps, args.eval_every)
            rows = evaluate_run(exp, judge, args.num_samples, args.sample_steps, args.cfg_scale)
            curves[arm]["steps"] = [r["step"] for r in rows]
            curves[arm]["fd"].append([r["fd"] for r in rows])
            curves[arm]["acc"].append([r["acc"] for r in rows])
            runs.append({"arm": arm, "seed": seed, "curve": rows, **final_losses(exp)})
            log(f"{name}: final fd {rows[-1]['fd']:.2f} acc {rows[-1]['acc']:.3f} "
                f"({time.perf_counter() - t_start:.0f} s so far)")

    steps = curves["repa"]["steps"]
    mean = {arm: {k: np.asarray(curves[arm][k]).mean(0).tolist() for k in ("fd", "acc")} for arm in arms}
    fd_ratio = steps_ratio(steps, mean["vanilla"]["fd"], mean["repa"]["fd"])
    acc_ratio = steps_ratio(steps, mean["vanilla"]["acc"], mean["repa"]["acc"], higher_is_better=True)
    per_seed = [steps_ratio(steps, curves["vanilla"]["fd"][i], curves["repa"]["fd"][i])["ratio"]
                for i in range(len(seeds))]
    png = os.path.join(args.out, "repa_effect.png")
    plot(curves, fd_ratio, png)
    if args.img:
        os.makedirs(os.path.dirname(os.path.abspath(args.img)), exist_ok=True)
        shutil.copyfile(png, args.img)

    result = {"steps": steps, "mean": mean, "curves": curves, "fd_ratio": fd_ratio, "acc_ratio": acc_ratio,
              "per_seed_fd_ratio": per_seed, "runs": runs, "teacher": teacher_info, "judge": judge_info,
              "settings": {**vars(args), "model": MODEL, "model_kwargs": MODEL_KWARGS, **TRAIN_FLAGS},
              "seconds": round(time.perf_counter() - t_start, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)

    print("step   " + "  ".join(f"{s:>7d}" for s in steps))
    for arm in ("vanilla", "repa"):
        print(f"{arm:7s}FD  " + "  ".join(f"{v:7.2f}" for v in mean[arm]["fd"]))
        print(f"{arm:7s}acc " + "  ".join(f"{v:7.3f}" for v in mean[arm]["acc"]))
    print(f"plot: {png}")
    summary = {"steps_ratio": fd_ratio["ratio"], "metric": "judge FD, mean of seeds", "seeds": seeds,
               "final_fd": {a: mean[a]["fd"][-1] for a in arms}, "final_acc": {a: mean[a]["acc"][-1] for a in arms},
               "acc_steps_ratio": acc_ratio["ratio"], "per_seed_steps_ratio": per_seed,
               "seconds": result["seconds"]}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
