"""Does representation alignment speed up training? REPA vs vanilla SiT, a fair small-scale study.

    python bench/repa_effect.py                         # digits at 64 px, 3 seeds; about 45 min on 2 idle cores
    python bench/repa_effect.py --quick                 # smoke test, about 10 min
    python bench/repa_effect.py --source imagefolder:DIR --res 64 --quick

Protocol (everything through the project's own code; the two arms differ ONLY in --proj-coeff):

1. split: the source (anything repa-preprocess accepts: digits, imagefolder:DIR, hf:NAME) is read at --res and
   cut by a seeded permutation into two disjoint halves (`preprocess.demo_teacher.split_halves`);
2. teacher: the demo teacher recipe (`preprocess.demo_teacher`) trained on half A (--teacher-steps is the
   teacher-quality knob). Its token grid is R/16 per side, EQUAL to the student's: SiT-/2 on the R/8 latent
   of the demo autoencoder (the geometry of SiT-/2 on the SD-VAE latent with DINOv2's 16x16 grid at 256 px);
3. judge: `repa.sampler.digits_judge` (a convnet + its features) trained on half B; it never sees the teacher;
4. data: the demo autoencoder (`demo_teacher.VAERecipe`, trained on all images: it is the data's codec,
   like the SD-VAE), then `repa-preprocess SOURCE --res R --vae <it> --enc-type timm:local-dir:<teacher>`;
5. lr: for each arm, the best of the same sweep (--lrs, >= 3 values) by final judge FD on a tuning seed
   (--tune-seed) that is not among the reported seeds: vanilla is tuned exactly like REPA;
6. runs: each arm at its lr for every reported seed, same steps, batch, EMA; a checkpoint every --eval-every;
7. per checkpoint: class-balanced samples from the EMA weights, the same initial noise for every run
   (Euler ODE, no guidance by default), judged by FD to the real images (judge features) and class
   accuracy; and the alignment probe (`repa.sampler.align`: CKNNA at t=0.5 of the encoder-depth block and
   of the projector with the teacher);
8. statistics: mean and 95% interval over seeds (Student t); steps_ratio = vanilla's final step count /
   steps REPA needs to reach vanilla's final FD (mean curves, linear interpolation; < 1 means REPA is
   slower: then vanilla's steps to REPA's final FD / final steps); its 95% interval from 2,000 bootstrap
   resamples of the seeds of each arm; the final-FD and accuracy gaps at equal steps with t intervals.

The last line printed is JSON: steps_ratio, steps_ratio_ci, acc_steps_ratio, final_fd, final_acc, ...
Outputs: --out/results.json, repa_effect.png (curves), repa_effect_cknna.png (alignment vs step); --img DIR
also copies the PNGs there (e.g. docs/img). Runs are cached in --out: a rerun reuses finished runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing as mp
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

# The demo's student (scripts/demo.sh uses the same values): SiT-/2 on the demo autoencoder's R/8 latent ->
# an (R/16)^2 token grid, the teacher's grid; 4 blocks of width 128, REPA tap after block 2.
MODEL = "SiT-S/2"
MODEL_KWARGS = {"hidden_size": 128, "depth": 4, "num_heads": 4, "projector_dim": 256}
STUDENT_PATCH = 16  # in pixels: patch 2 on the 8x latent
TRAIN_FLAGS = dict(batch_size=64, ema_decay=0.995, mixed_precision="no", num_workers=0, sampling_steps=0,
                   cfg_prob=0.1, progress=False)
DEFAULTS = dict(res=64, seeds="0,1,2", tune_seed=100, lrs="1e-3,2e-3,4e-3", steps=1200, eval_every=200,
                num_samples=200, probe_samples=500, teacher_steps=300, judge_steps=300)
QUICK = dict(seeds="0,1,2", lrs="1e-3,2e-3,4e-3", steps=300, eval_every=50, num_samples=100, probe_samples=300,
             teacher_steps=150, judge_steps=150)


def log(msg: str) -> None:
    print(f"[repa_effect {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ curves -> steps ratio and intervals

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


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of ``values`` (axis 0)."""
    from scipy import stats
    v = np.asarray(values, np.float64)
    n = v.shape[0]
    mean = v.mean(0)
    if n < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, n - 1) * v.std(0, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


def gap_interval(vanilla, repa) -> dict:
    """vanilla - repa of the final values: Welch 95% t interval of the difference of means."""
    from scipy import stats
    a, b = np.asarray(vanilla, np.float64), np.asarray(repa, np.float64)
    diff = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return {"gap": float(diff), "ci": [float(diff), float(diff)]}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    return {"gap": float(diff), "ci": [float(diff - half), float(diff + half)]}


def bootstrap_ratio(steps, vanilla, repa, higher_is_better=False, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of steps_ratio over resamples (with replacement) of each arm's seeds."""
    rng = np.random.default_rng(seed)
    v, r = np.asarray(vanilla, np.float64), np.asarray(repa, np.float64)
    out = []
    for _ in range(n):
        vm = v[rng.integers(0, len(v), len(v))].mean(0)
        rm = r[rng.integers(0, len(r), len(r))].mean(0)
        ratio = steps_ratio(steps, vm, rm, higher_is_better)["ratio"]
        if ratio is not None:
            out.append(ratio)
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))] if out else [None, None]


# ------------------------------------------------------------------ stages

def make_teacher(args) -> tuple[str, dict]:
    """The demo teacher recipe on half A of the source (cached under --out/teachers)."""
    from repa.preprocess.demo_teacher import INFO_FILE, TeacherRecipe, ensure_teacher

    recipe = TeacherRecipe(source=args.source, resolution=args.res, patch_size=args.teacher_patch,
                           steps=args.teacher_steps)
    path = ensure_teacher(args.cache, recipe, log=log)
    with open(os.path.join(path, INFO_FILE)) as f:
        return path, json.load(f)


def make_vae(args) -> str:
    from repa.preprocess.demo_teacher import VAERecipe, ensure_vae
    return ensure_vae(args.cache, VAERecipe(source=args.source, resolution=args.res), log=log)


def make_shards(args, teacher: str, teacher_info: dict, vae: str) -> str:
    """repa-preprocess the whole source with the teacher (reused when complete); checks the token grids."""
    out = os.path.join(args.out, f"shards-{teacher_info['recipe']['steps']}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        cmd = [sys.executable, "-m", "repa.preprocess.cli", args.source, "--res", str(args.res), "--vae", vae,
               "--enc-type", f"timm:local-dir:{teacher}", "--out", out, "--num-workers", "1", "--no-progress"]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
    from repa.shards.manifest import read_manifest
    tokens = read_manifest(out).fields["feat.0"].shape[0]
    student = (args.res // STUDENT_PATCH) ** 2
    if tokens != student:
        raise SystemExit(f"repa_effect: the teacher has {tokens} tokens but the student {student}; the study "
                         f"needs equal grids (--res a multiple of 16, student patch 16)")
    return out


def run_config(args, shards: str, name: str, proj_coeff: float, lr: float, seed: int, steps: int):
    from repa.trainer.train import TrainConfig
    return TrainConfig(shards=shards, output_dir=os.path.join(args.out, "exps"), exp_name=name, model=MODEL,
                       model_kwargs=dict(MODEL_KWARGS), encoder_depth=args.encoder_depth, proj_coeff=proj_coeff,
                       learning_rate=lr, seed=seed, max_train_steps=steps, checkpointing_steps=args.eval_every,
                       resume="auto", **TRAIN_FLAGS)


@functools.lru_cache(maxsize=2)
def _decoder_vae(spec: str):
    from repa.preprocess.vae import load_vae
    return load_vae(spec)


@torch.no_grad()
def sample_checkpoint(ckpt: str, num: int, num_steps: int, cfg_scale: float, seed: int = 0):
    """Class-balanced samples of a checkpoint's EMA weights: uint8 (N, 3, R, R) and their labels."""
    from repa.sampler import euler_sampler
    from repa.sampler.generate import LatentDecoder, initial_noise, make_labels
    from repa.sampler.load import load_sampling_model

    model, config = load_sampling_model(ckpt, weights="ema", device="cpu")
    kw = config["model"]["kwargs"]
    vae = config["data"]["vae"]
    decoder = LatentDecoder(_decoder_vae(vae["id"] or "none"), vae["scale"], vae["bias"], "cpu")
    labels = torch.from_numpy(make_labels(num, seed, kw["num_classes"], label_sampling="balanced"))
    z = initial_noise(range(num), seed, [kw["in_channels"], kw["input_size"], kw["input_size"]])
    x = euler_sampler(model, z, labels, num_steps=num_steps, cfg_scale=cfg_scale)
    images = torch.from_numpy(decoder(x.float())).permute(0, 3, 1, 2).contiguous()
    return images, labels, model, config


def _probe(model, config, records, encoder_depth: int) -> dict:
    from repa.sampler.align import cknna, pooled_states, _model_inputs, _noise, _null_class

    x0, y = _model_inputs(config, records, "null", _null_class(model))
    eps = _noise(records["key"], 0, x0.shape[1:])
    states = pooled_states(model, x0, y, eps, 0.5, layers=[encoder_depth])
    return {"cknna_block": cknna(states[encoder_depth], records["feat"]),
            "cknna_proj": cknna(states["projector"], records["feat"])}


def run_one(job: dict) -> list[dict]:
    """Train one run (resumes/skips if complete), then judge and probe every checkpoint (cached)."""
    torch.set_num_threads(job["threads"])
    from repa.sampler.digits_judge import load_or_train_judge
    from repa.sampler.align import read_probe_records
    from repa.trainer.train import train

    args = argparse.Namespace(**job["args"])
    cfg = run_config(args, job["shards"], job["name"], job["proj_coeff"], job["lr"], job["seed"], job["steps"])
    exp = os.path.join(cfg.output_dir, cfg.exp_name)
    if not os.path.isdir(os.path.join(exp, "checkpoints", f"{job['steps']:07d}")):
        t0 = time.perf_counter()
        train(cfg)
        log(f"{job['name']}: {job['steps']} steps in {time.perf_counter() - t0:.0f} s")
    judge, _ = load_or_train_judge(os.path.join(args.out, "judge"), args.res, source=args.source,
                                   steps=args.judge_steps, log=None)
    records = read_probe_records(job["shards"], args.probe_samples)
    cache = os.path.join(exp, "judged.json")
    done = {}
    if os.path.isfile(cache):
        with open(cache) as f:
            done = {r["step"]: r for r in json.load(f)}
    root = os.path.join(exp, "checkpoints")
    rows = []
    for name in sorted(os.listdir(root)):
        if not name.isdigit() or int(name) > job["steps"]:
            continue
        step = int(name)
        if step not in done:
            images, labels, model, config = sample_checkpoint(os.path.join(root, name), args.num_samples,
                                                              args.sample_steps, args.cfg_scale)
            done[step] = {"step": step, **judge.score(images, labels),
                          **_probe(model, config, records, args.encoder_depth)}
        rows.append(done[step])
    tmp = cache + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, cache)
    with open(os.path.join(exp, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    speed = float(np.median([r["steps_per_s"] for r in recs if "steps_per_s" in r] or [float("nan")]))
    return [dict(r, steps_per_s=speed) for r in rows]


def run_jobs(jobs: list[dict], workers: int) -> list[list[dict]]:
    """Run jobs in ``workers`` spawned processes of one thread each (tiny models: two 1-thread runs beat one
    2-thread run), in order of submission; results in job order."""
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(run_one, jobs))


# ------------------------------------------------------------------ figures

def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(curves: dict, summary: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.9))
    colors = {"vanilla": "tab:gray", "repa": "tab:red"}
    for ax, key, label in ((axes[0], "fd", "FD to real images (judge features), lower is better"),
                           (axes[1], "acc", "class accuracy of samples (judge), higher is better")):
        for arm in ("vanilla", "repa"):
            mean, lo, hi = t_interval(curves[arm][key])
            lr = summary["lr"][arm]
            name = (f"SiT + REPA (proj-coeff {summary['proj_coeff']:g})" if arm == "repa" else "SiT (proj-coeff 0)")
            ax.plot(curves["steps"], mean, "o-", ms=3, color=colors[arm], label=f"{name}, lr {lr:g}")
            ax.fill_between(curves["steps"], lo, hi, color=colors[arm], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    r = summary["fd_ratio"]
    axes[0].axhline(r["target"], color="k", ls=":", lw=0.8)
    if r["direction"] == "repa reaches vanilla":
        axes[0].axvline(r["repa_steps"], color="tab:red", ls=":", lw=1)
    ci = summary["steps_ratio_ci"]
    ci_txt = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
    axes[0].legend(fontsize=7, title=f"steps ratio {r['ratio']:.2f}x{ci_txt}", title_fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{title}: mean and 95% interval over {len(curves['repa']['fd'])} seeds", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_cknna(curves: dict, summary: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    colors = {"vanilla": "tab:gray", "repa": "tab:red"}
    for ax, key, label in ((axes[0], "cknna_block", f"block {summary['encoder_depth']} (the REPA tap)"),
                           (axes[1], "cknna_proj", "projector output")):
        for arm in ("vanilla", "repa"):
            mean, lo, hi = t_interval(curves[arm][key])
            ax.plot(curves["steps"], mean, "o-", ms=3, color=colors[arm], label=arm)
            ax.fill_between(curves["steps"], lo, hi, color=colors[arm], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel("CKNNA with the teacher (k=10)")
        ax.set_title(f"{label}, t=0.5, null class", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: alignment with the teacher during training (repa.sampler.align)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default="digits", help="digits | imagefolder:DIR | hf:NAME (as repa-preprocess)")
    p.add_argument("--res", type=int, default=None, help=f"crop side, a multiple of 16 [{DEFAULTS['res']}]")
    p.add_argument("--out", default=None, help="[bench_out/repa_effect-<source>]")
    p.add_argument("--quick", action="store_true", help=f"smoke-test settings {QUICK}")
    p.add_argument("--seeds", default=None, help=f"reported seeds [{DEFAULTS['seeds']}]")
    p.add_argument("--tune-seed", type=int, default=None, help="seed of the lr sweep (never reported)")
    p.add_argument("--lrs", default=None, help=f"the lr sweep of both arms [{DEFAULTS['lrs']}]")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run [{DEFAULTS['steps']}]")
    p.add_argument("--eval-every", type=int, default=None, help=f"checkpoint/judge every N [{DEFAULTS['eval_every']}]")
    p.add_argument("--num-samples", type=int, default=None, help="class-balanced samples per checkpoint")
    p.add_argument("--probe-samples", type=int, default=None, help="records of the CKNNA probe")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (quality knob)")
    p.add_argument("--teacher-patch", type=int, default=2, help="teacher input = patch * R/16 px")
    p.add_argument("--judge-steps", type=int, default=None)
    p.add_argument("--encoder-depth", type=int, default=2, help="1-based block the projector reads")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="REPA arm's alignment weight (vanilla: 0)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler ODE steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance (measures the model itself)")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--img", default=None, help="also copy the PNGs into this folder")
    p.add_argument("--cache", default=None, help="teacher/autoencoder cache (keyed by recipe hash) "
                                                 "[$REPA_CACHE or ~/.cache/repa]")
    args = p.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.res % 16:
        p.error(f"--res {args.res}: must be a multiple of 16 (teacher grid R/16 = student grid, patch 16)")
    if args.steps // args.eval_every < 6:
        p.error(f"--steps {args.steps} / --eval-every {args.eval_every}: the curves need >= 6 checkpoints")
    args.lr_list = [float(v) for v in args.lrs.split(",")]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    if len(args.lr_list) < 3 or len(args.seed_list) < 3 and not args.quick:
        p.error("--lrs needs >= 3 values and --seeds >= 3 seeds (a fair sweep, an interval)")
    if args.tune_seed in args.seed_list:
        p.error(f"--tune-seed {args.tune_seed} is a reported seed; the lr must be chosen on another seed")
    if args.proj_coeff <= 0:
        p.error("--proj-coeff must be > 0 (the REPA arm; the vanilla arm is proj-coeff 0)")
    from repa.preprocess.demo_teacher import default_cache_root
    args.cache = args.cache or default_cache_root()
    tag = args.source.replace(":", "-").replace("/", "_").strip("_")[-40:]
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "bench_out", f"repa_effect-{tag}"
                                                        + ("-quick" if args.quick else "")))
    return args


def _jobs(args, shards, arm_lrs: dict, seeds, steps) -> list[dict]:
    coeffs = {"repa": args.proj_coeff, "vanilla": 0.0}
    a = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None), list))}
    return [{"args": a, "shards": shards, "name": f"{arm}-pc{coeffs[arm]:g}-ed{args.encoder_depth}-lr{lr:g}-seed{seed}",
             "arm": arm, "proj_coeff": coeffs[arm], "lr": lr, "seed": seed, "steps": steps, "threads": 1}
            for seed in seeds for arm, lrs in arm_lrs.items() for lr in lrs]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # 2 threads on a busy machine: far slower
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    teacher, teacher_info = make_teacher(args)
    shards = make_shards(args, teacher, teacher_info, make_vae(args))
    from repa.sampler.digits_judge import load_or_train_judge
    _, judge_info = load_or_train_judge(os.path.join(args.out, "judge"), args.res, source=args.source,
                                        steps=args.judge_steps, log=log)  # trained once, before the workers

    sweep = _jobs(args, shards, {"repa": args.lr_list, "vanilla": args.lr_list}, [args.tune_seed], args.steps)
    tuning = {"repa": {}, "vanilla": {}}
    for job, rows in zip(sweep, run_jobs(sweep, args.jobs)):
        tuning[job["arm"]][job["lr"]] = rows[-1]["fd"]
    best = {arm: min(v, key=v.get) for arm, v in tuning.items()}
    edge = [arm for arm, lr in best.items() if lr in (min(args.lr_list), max(args.lr_list))]
    if edge:
        log(f"note: the best lr of {edge} is at the edge of the sweep {args.lr_list}; widen --lrs to be sure")
    log(f"lr sweep on seed {args.tune_seed} (final FD): {tuning} -> {best} "
        f"({time.perf_counter() - t0:.0f} s so far)")

    jobs = _jobs(args, shards, {arm: [lr] for arm, lr in best.items()}, args.seed_list, args.steps)
    results = run_jobs(jobs, args.jobs)
    curves = {"steps": [r["step"] for r in results[0]]}
    for arm in ("repa", "vanilla"):
        runs = [rows for job, rows in zip(jobs, results) if job["arm"] == arm]
        curves[arm] = {k: [[r[k] for r in rows] for rows in runs]
                       for k in ("fd", "acc", "cknna_block", "cknna_proj")}
        curves[arm]["steps_per_s"] = [rows[0]["steps_per_s"] for rows in runs]
    return report(args, curves, best, tuning, teacher_info, judge_info, t0, edge)


def report(args, curves, best, tuning, teacher_info, judge_info, t0, edge=()) -> dict:
    steps = curves["steps"]
    mean = {arm: {k: np.asarray(curves[arm][k]).mean(0).tolist() for k in ("fd", "acc", "cknna_block", "cknna_proj")}
            for arm in ("repa", "vanilla")}
    fd_ratio = steps_ratio(steps, mean["vanilla"]["fd"], mean["repa"]["fd"])
    acc_ratio = steps_ratio(steps, mean["vanilla"]["acc"], mean["repa"]["acc"], higher_is_better=True)
    summary = {
        "steps_ratio": fd_ratio["ratio"], "direction": fd_ratio["direction"], "lower_bound": fd_ratio["lower_bound"],
        "steps_ratio_ci": bootstrap_ratio(steps, curves["vanilla"]["fd"], curves["repa"]["fd"]),
        "acc_steps_ratio": acc_ratio["ratio"], "acc_direction": acc_ratio["direction"],
        "acc_steps_ratio_ci": bootstrap_ratio(steps, curves["vanilla"]["acc"], curves["repa"]["acc"], True),
        "final_fd": {a: mean[a]["fd"][-1] for a in mean}, "final_acc": {a: mean[a]["acc"][-1] for a in mean},
        "final_fd_gap": gap_interval([c[-1] for c in curves["vanilla"]["fd"]], [c[-1] for c in curves["repa"]["fd"]]),
        "final_acc_gap": gap_interval([c[-1] for c in curves["vanilla"]["acc"]],
                                      [c[-1] for c in curves["repa"]["acc"]]),
        "final_cknna_block": {a: mean[a]["cknna_block"][-1] for a in mean},
        "lr": best, "lr_at_sweep_edge": list(edge), "seeds": args.seed_list, "tune_seed": args.tune_seed, "steps": args.steps,
        "proj_coeff": args.proj_coeff, "encoder_depth": args.encoder_depth, "source": args.source, "res": args.res,
        "teacher_steps": args.teacher_steps, "teacher_heldout_acc": teacher_info["heldout_accuracy"],
        "judge_heldout_acc": judge_info["heldout_accuracy"], "quick": args.quick,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    summary["fd_ratio"] = fd_ratio
    title = f"REPA vs vanilla SiT on {args.source} at {args.res} px"
    png = os.path.join(args.out, "repa_effect.png")
    png_ck = os.path.join(args.out, "repa_effect_cknna.png")
    plot_curves(curves, summary, png, title)
    plot_cknna(curves, summary, png_ck, title)
    if args.img:
        os.makedirs(args.img, exist_ok=True)
        suffix = "_quick" if args.quick else ""
        for src in (png, png_ck):
            shutil.copyfile(src, os.path.join(args.img, os.path.basename(src)[:-4] + suffix + ".png"))
    result = {"summary": summary, "curves": curves, "mean": mean, "acc_ratio": acc_ratio, "tuning": tuning,
              "teacher": teacher_info, "judge": judge_info,
              "settings": {**{k: v for k, v in vars(args).items() if k not in ("lr_list", "seed_list")},
                           "model": MODEL, "model_kwargs": MODEL_KWARGS, **TRAIN_FLAGS}}
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, os.path.join(args.out, "results.json"))

    print("step        " + "  ".join(f"{s:>7d}" for s in steps))
    for arm in ("vanilla", "repa"):
        for k in ("fd", "acc", "cknna_block"):
            print(f"{arm:7s} {k:11s}" + "  ".join(f"{v:7.3f}" for v in mean[arm][k]))
    print(f"plots: {png} {png_ck}")
    summary.pop("fd_ratio")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
