"""repa-eval align: CKNNA values (identities, a brute-force reference), the linear probe, the CLI end to end."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from repa.sampler.align import align_probe, cknna, cknna_reference, linear_probe, mutual_knn_mask, read_probe_records
from tests._train_shards import tiny_train_config, write_shards


def _feats(n=60, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_cknna_identities():
    x = _feats()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))  # a random orthogonal matrix
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cknna(x, x @ q) == pytest.approx(1.0, abs=1e-9)
    assert cknna(x, 3.0 * x) == pytest.approx(1.0, abs=1e-12)  # rows are L2-normalised: scale-free
    # independent features: few mutual neighbours and uncorrelated centred kernels
    noise = [cknna(_feats(400, 32, s), _feats(400, 32, 100 + s)) for s in range(3)]
    assert max(abs(v) for v in noise) < 0.05
    # a noisy copy sits in between, and more noise means less alignment
    rng = np.random.default_rng(2)
    a = cknna(x, x + 0.3 * rng.normal(size=x.shape))
    b = cknna(x, x + 1.0 * rng.normal(size=x.shape))
    assert 1.0 > a > b > 0.0


@pytest.mark.parametrize("n,d1,d2,k,seed", [(9, 3, 4, 2, 0), (14, 5, 2, 4, 1), (12, 4, 4, 11, 2)])
def test_cknna_matches_brute_force_loops(n, d1, d2, k, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d1))
    b = a[:, :min(d1, d2)] @ rng.normal(size=(min(d1, d2), d2)) + 0.5 * rng.normal(size=(n, d2))
    for normalize in (True, False):
        assert cknna(a, b, k, normalize) == pytest.approx(cknna_reference(a, b, k, normalize), rel=1e-10, abs=1e-12)


def test_cknna_all_neighbours_is_cka_without_the_diagonal():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(15, 4)), rng.normal(size=(15, 6))
    k, l = a @ a.T, b @ b.T
    h = np.eye(15) - 1 / 15
    kc, lc = h @ k @ h, h @ l @ h
    off = ~np.eye(15, dtype=bool)
    cka = (kc * lc)[off].sum() / np.sqrt((kc * kc)[off].sum() * (lc * lc)[off].sum())
    assert cknna(a, b, topk=14, normalize=False) == pytest.approx(cka, rel=1e-12)


def test_mutual_knn_mask_and_bad_k():
    k = torch.tensor([[0., 3, 2, 1], [3, 0, 1, 2], [2, 1, 0, 3], [1, 2, 3, 0]])
    l = torch.tensor([[0., 3, 1, 2], [3, 0, 2, 1], [1, 2, 0, 3], [2, 1, 3, 0]])
    m = mutual_knn_mask(k, l, 1)
    assert m.tolist() == [[False, True, False, False], [True, False, False, False],
                          [False, False, False, True], [False, False, True, False]]
    with pytest.raises(ValueError, match="k=10 needs 1 <= k <= n-1 = 4"):
        cknna(np.ones((5, 2)), np.ones((5, 2)), 10)


def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    centres = rng.normal(size=(3, 8)) * 5
    assert linear_probe(centres[labels] + rng.normal(size=(300, 8)), labels) == 1.0
    assert linear_probe(rng.normal(size=(300, 8)), labels) < 0.5


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from repa.trainer.train import train
    tmp = tmp_path_factory.mktemp("align")
    shards = write_shards(str(tmp / "shards"), n=48)  # latent 8, SiT /2 -> 4x4 tokens = the 16 teacher tokens
    train(tiny_train_config(shards, tmp / "exps", "run"))
    return shards, str(tmp / "exps" / "run" / "checkpoints" / "0000004")


def test_align_cli_end_to_end(tmp_path, tiny_checkpoint):
    shards, ckpt = tiny_checkpoint
    out = tmp_path / "res" / "align.json"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "repa.sampler.align", ckpt, "--shards", shards, "--t", "0.25,0.75",
           "--num-samples", "40", "--k", "5", "--out", str(out)]
    old = os.umask(0o022)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    res = json.loads(out.read_text())
    assert res["num_samples"] == 40 and res["k"] == 5 and res["cond"] == "null" and res["step"] == 4
    rows = res["rows"]
    names = [(r["t"], r["name"]) for r in rows]
    assert names == [(t, n) for t in (0.25, 0.75) for n in ("block1", "block2", "projector")] + [(None, "teacher")]
    assert all(-1.0 <= r["cknna"] <= 1.0 for r in rows[:-1]) and rows[-1]["cknna"] is None
    assert all(0.0 <= r["linear_probe_acc"] <= 1.0 for r in rows)
    assert rows[2]["layer"] == 1  # the projector sits on the encoder_depth=1 tap
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and stat.S_IMODE(png.stat().st_mode) == 0o644
    assert "plot: " in proc.stderr and "cknna" in proc.stderr
    # the same probe in-process gives the same values (the noise is seeded per record key)
    from repa.sampler.load import load_sampling_model
    model, config = load_sampling_model(ckpt)
    again = align_probe(model, config, read_probe_records(shards, 40), ts=[0.25], topk=5)
    assert [r["cknna"] for r in again[:3]] == pytest.approx([r["cknna"] for r in rows[:3]], abs=1e-9)


def test_align_cli_refuses_bad_input(tmp_path, tiny_checkpoint, capsys):
    from repa.sampler.align import cli
    shards, ckpt = tiny_checkpoint
    no_feat = write_shards(str(tmp_path / "nofeat"), n=16, teachers=())

    def run(*args):  # the click command in-process (the end-to-end test above runs the real process)
        with pytest.raises(SystemExit) as e:
            cli(["align", ckpt, *args])  # a leading "align" (repa-eval's subcommand word) is accepted
        return e.value.code, capsys.readouterr().err
    code, err = run("--shards", no_feat)
    assert code == 1 and f"--shards {no_feat}: no teacher field feat.0 (has none)" in err
    code, err = run("--shards", shards, "--layers", "3", "--num-samples", "20", "--k", "3", "--no-probe")
    assert code == 1 and "--layers [3]: the SiT has blocks 1..2" in err
    code, err = run("--shards", shards, "--t", "1.5")
    assert code == 1 and "--t 1.5: noise levels must lie in [0, 1]" in err
    code, err = run("--shards", shards, "--num-samples", "8")
    assert code == 1 and "--num-samples 8: must exceed --k 10" in err
    assert not os.path.exists(os.path.join(ckpt, "align.json"))  # refused before any output
