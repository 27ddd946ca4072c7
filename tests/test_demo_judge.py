"""The independent judge's metrics, the steps-ratio arithmetic of bench/repa_effect.py and the demo figures."""
import json

import numpy as np
import pytest
import torch

from repa.sampler.digits_judge import DigitsCNN, Judge, frechet_distance, gaussian_stats
from bench.repa_effect import bootstrap_ratio, gap_interval, parse_args, steps_ratio, steps_to_reach, t_interval


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general SPD matrices: tr(S1 + S2 - 2 sqrtm(S1 S2)) via scipy's matrix square root
    from scipy.linalg import sqrtm
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    ref = ((mu1[:6] - mu2[:6]) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1[:6], s1, mu2[:6], s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1[:6], s1, mu1[:6], s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussian_features():
    """Statistics of many Gaussian feature vectors give the closed-form distance of the two Gaussians."""
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.5, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    f1 = mu1 + sd1 * rng.standard_normal((n, d))
    f2 = mu2 + sd2 * rng.standard_normal((n, d))
    closed = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()  # 2.25 + 6 = 8.25
    got = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert got == pytest.approx(closed, rel=0.02)


def test_judge_score_on_real_images_and_perfect_labels():
    torch.manual_seed(0)
    model = DigitsCNN()
    real = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    judge = Judge(model, real)
    labels = judge.predict(real)
    s = judge.score(real, labels)
    assert s["acc"] == 1.0
    assert s["fd"] == pytest.approx(0.0, abs=1e-6)
    assert judge.score(real, (labels + 1) % 10)["acc"] == 0.0


def test_steps_to_reach_interpolates():
    steps = [100, 200, 300, 400]
    assert steps_to_reach(steps, [10, 8, 6, 5], 7.0) == pytest.approx(250.0)
    assert steps_to_reach(steps, [10, 8, 6, 5], 11.0) == 100.0
    assert steps_to_reach(steps, [10, 8, 6, 5], 4.0) is None
    assert steps_to_reach(steps, [0.1, 0.5, 0.7, 0.9], 0.6, higher_is_better=True) == pytest.approx(250.0)


def test_steps_ratio_both_directions():
    steps = [100, 200, 300, 400]
    faster = steps_ratio(steps, vanilla=[10, 8, 7, 6], repa=[9, 6, 5, 4])
    assert faster["ratio"] == pytest.approx(400 / 200) and faster["direction"] == "repa reaches vanilla"
    slower = steps_ratio(steps, vanilla=[9, 6, 5, 4], repa=[10, 8, 7, 6])
    assert slower["ratio"] == pytest.approx(200 / 400) and slower["ratio"] < 1


def test_intervals_of_the_study():
    mean, lo, hi = t_interval([[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]])
    # mean 2, 3; sd 1; t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4841
    assert mean.tolist() == [2.0, 3.0] and lo[0] == pytest.approx(2 - 2.48414, abs=1e-4)
    assert hi[1] == pytest.approx(3 + 2.48414, abs=1e-4)
    g = gap_interval([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # Welch: se = sqrt(2/3), df = 4, t = 2.7764
    assert g["gap"] == 2.0 and g["ci"][0] == pytest.approx(2 - 2.7764 * (2 / 3) ** 0.5, abs=1e-3)
    steps = [1, 2, 3, 4, 5, 6]
    vanilla = [[6, 5, 4, 3, 2, 1.0], [6, 5, 4, 3, 2.2, 1.2], [6, 5, 4, 3, 2, 0.9]]
    repa = [[5, 3, 1, .8, .7, .6], [5, 3.2, 1.1, .8, .7, .6], [5, 3, 1, .9, .7, .5]]
    point = steps_ratio(steps, np.mean(vanilla, 0), np.mean(repa, 0))["ratio"]
    lo, hi = bootstrap_ratio(steps, vanilla, repa, n=300)
    assert point == pytest.approx(2.0) and 1.5 < lo <= point <= hi < 2.2
    assert bootstrap_ratio(steps, vanilla, repa, n=300) == [lo, hi]  # seeded


def test_study_flags_refuse_unfair_settings(capsys):
    for argv, msg in ((["--lrs", "1e-3,2e-3"], "--lrs needs >= 3 values"),
                      (["--tune-seed", "1"], "--tune-seed 1 is a reported seed"),
                      (["--steps", "500", "--eval-every", "100"], "the curves need >= 6 checkpoints"),
                      (["--res", "40"], "--res 40: must be a multiple of 16"),
                      (["--proj-coeff", "0"], "--proj-coeff must be > 0")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert msg in capsys.readouterr().err
    args = parse_args(["--quick"])
    assert args.steps // args.eval_every >= 6 and len(args.lr_list) >= 3 and len(args.seed_list) >= 3


def test_demo_figures(tmp_path):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "plot_losses", os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_losses.py"))
    pl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pl)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 41):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "proj_loss": -s / 40}) + "\n")
    m = pl.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert m["step"].tolist() == list(range(1, 41))
    assert pl.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    png = pl.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    assert os.path.getsize(png) > 1000
    images = np.zeros((20, 8, 8, 3), np.uint8)
    labels = np.arange(20) % 10
    images[:, :, :, 0] = labels[:, None, None] * 20
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
    from repa.sampler.npz import read_png
    grid = read_png(pl.class_grid(str(tmp_path / "s.npz"), str(tmp_path / "g.png"), per_class=2, scale=1))
    assert grid.shape == (10 * 10 + 2, 2 * 10 + 2, 3)
    for k in range(10):  # row k holds class k's samples
        assert grid[2 + k * 10, 2, 0] == k * 20 and grid[2 + k * 10, 12, 0] == k * 20
