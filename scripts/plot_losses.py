"""The demo's two pictures: training loss curves (from metrics.jsonl) and a samples grid with one row per class.

    python scripts/plot_losses.py --metrics EXP/metrics.jsonl --npz SAMPLES.npz --out-dir demo_out

writes ``loss_curves.png`` (denoising loss and REPA alignment loss vs step, raw and smoothed) and
``samples_by_class.png`` (the ``.npz`` written by repa-sample: ``arr_0`` uint8 NHWC images, ``arr_1`` labels;
row k holds the samples of class k, tiled with the sampler's own `make_grid`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def read_metrics(path: str) -> dict[str, np.ndarray]:
    """metrics.jsonl of repa-train -> {"step", "loss", "proj_loss"} arrays (lines without a step are skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if "step" in rec and "loss" in rec:
                    rows.append(rec)
    if not rows:
        raise SystemExit(f"plot_losses: {path} has no training records; did repa-train run?")
    return {k: np.asarray([r.get(k, np.nan) for r in rows], dtype=np.float64) for k in ("step", "loss", "proj_loss")}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_losses(metrics_path: str, out_png: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(metrics_path)
    window = max(1, len(m["step"]) // 30)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "loss", "denoising loss (v-prediction MSE)"),
                           (axes[1], "proj_loss", "alignment loss (-cos sim. to teacher tokens)")):
        ax.plot(m["step"], m[key], color="tab:blue", alpha=0.25, lw=0.8, label="per step")
        ax.plot(m["step"], smooth(m[key], window), color="tab:blue", lw=1.8, label=f"mean of {window} steps")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"repa-train: {os.path.dirname(os.path.abspath(metrics_path))}", fontsize=8)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def class_grid(npz_path: str, out_png: str, per_class: int = 10, scale: int | None = None) -> str:
    """One row per class (the first ``per_class`` samples of each label), upscaled ``scale``x (nearest;
    default: to at least 64 px per tile)."""
    from repa.sampler.npz import make_grid, save_png

    with np.load(npz_path) as d:
        images, labels = d["arr_0"], d["arr_1"] if "arr_1" in d else None
    if labels is None:
        raise SystemExit(f"plot_losses: {npz_path} has no arr_1 labels; sample with repa-sample")
    classes = np.unique(labels)
    h, w, c = images.shape[1:]
    blank = np.zeros((h, w, c), dtype=np.uint8)
    tiles = []
    for k in classes:
        row = list(images[labels == k][:per_class])
        tiles += row + [blank] * (per_class - len(row))
    grid = make_grid(np.stack(tiles), nrow=per_class)
    scale = max(1, 64 // h) if scale is None else scale
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(out_png, grid)
    return out_png


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", required=True, help="<output-dir>/<exp-name>/metrics.jsonl of repa-train")
    p.add_argument("--npz", default=None, help="the .npz printed by repa-sample")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--per-class", type=int, default=10)
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    print(plot_losses(args.metrics, os.path.join(args.out_dir, "loss_curves.png")))
    if args.npz:
        print(class_grid(args.npz, os.path.join(args.out_dir, "samples_by_class.png"), args.per_class))


if __name__ == "__main__":
    main()
