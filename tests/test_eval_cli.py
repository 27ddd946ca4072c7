"""FID Inception port (random weights from a local file) and repa-eval end to end on small npz files."""
import json

import numpy as np
import pytest
import torch

from repa.sampler.eval_cli import main as eval_main
from repa.sampler.inception import (FID_WEIGHTS_NAME, FIDInceptionV3, InceptionWeightsError, load_fid_inception,
                               tf_resize_bilinear)
from repa.sampler.metrics import feature_statistics, frechet_distance, inception_score


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # non-trivial BN statistics so the features are not degenerate
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inc") / FID_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return str(path)


def test_tf_resize_bilinear_legacy_alignment():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    # TF1 ResizeBilinear(align_corners=False): src = dst * in / out, no half-pixel offset, edge clamped
    np.testing.assert_allclose(tf_resize_bilinear(x, 8)[0, 0, 0].numpy(), [0, .5, 1, 1.5, 2, 2.5, 3, 3])
    y = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(tf_resize_bilinear(torch.rand(1, 3, 299, 299), 299).shape, torch.Size([1, 3, 299, 299]))
    assert tf_resize_bilinear(y, 299).shape == (1, 3, 299, 299)


def test_inception_loads_from_local_file_and_shapes(weights):
    net = load_fid_inception(weights)
    imgs = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    tap = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: tap.append(out))
    with torch.no_grad():
        out = net(imgs)
    hook.remove()
    assert out["pool3"].shape == (1, 2048) and out["spatial"].shape == (1, 7 * 17 * 17)
    assert out["logits"].shape == (1, 1008)
    torch.testing.assert_close(net.preprocess(imgs), net.preprocess(imgs.permute(0, 3, 1, 2)))  # NCHW accepted
    assert net.preprocess(imgs).shape == (1, 3, 299, 299)
    # logits are pool3 @ W (no bias), spatial is Mixed_6d.branch1x1 channels 0..6 in NHWC order
    torch.testing.assert_close(out["logits"], out["pool3"] @ net.fc.weight.T)
    assert tap[0].shape == (1, 192, 17, 17)
    torch.testing.assert_close(out["spatial"][0], tap[0][0, :7].permute(1, 2, 0).reshape(-1))
    assert torch.all(out["pool3"] >= 0)  # mean of ReLU outputs


def test_missing_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("repa.sampler.inception.FID_WEIGHTS_URL", "http://127.0.0.1:9/" + FID_WEIGHTS_NAME)
    with pytest.raises(InceptionWeightsError, match="--inception-weights") as e:
        load_fid_inception(None, timeout=5)
    assert FID_WEIGHTS_NAME in str(e.value)
    with pytest.raises(InceptionWeightsError, match="no such file"):
        load_fid_inception(str(tmp_path / "nope.pth"))


def test_repa_eval_end_to_end(weights, tmp_path, capsys, monkeypatch):
    from repa.sampler import eval_cli
    rng = np.random.default_rng(0)
    smp = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ref = np.clip(rng.normal(128, 40, (5, 16, 16, 3)), 0, 255).astype(np.uint8)[:4]
    np.savez(tmp_path / "samples.npz", arr_0=smp)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    seen = {}
    real = eval_cli.compute_activations

    def spy(model, images, *a, **k):
        seen[k.get("desc", a[2] if len(a) > 2 else "")] = out = real(model, images, *a, **k)
        return out
    monkeypatch.setattr(eval_cli, "compute_activations", spy)
    res = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                     weights, "--batch-size", "4", "--no-progress"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(res))
    assert json.load(open(tmp_path / "samples.eval.json")) == printed
    fr, fs = seen["reference features"], seen["sample features"]
    assert fs["pool3"].shape == (4, 2048) and fr["spatial"].shape == (4, 2023)
    fid, _ = frechet_distance(*feature_statistics(fr["pool3"]), *feature_statistics(fs["pool3"]),
                              features2=fs["pool3"])
    assert res["fid"] == pytest.approx(fid, rel=1e-9) and res["fid"] > 0
    assert res["inception_score"] == pytest.approx(inception_score(fs["logits"]), rel=1e-9)
    assert np.isfinite(res["sfid"]) and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    # precomputed reference statistics (ADM reference batch keys) are used as they are
    mu, sigma = feature_statistics(fr["pool3"])
    mu_s, sigma_s = feature_statistics(fr["spatial"])
    np.savez(tmp_path / "ref_stats.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    monkeypatch.setattr(eval_cli, "compute_activations", lambda model, images, *a, **k: fs)
    res2 = eval_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"), "--inception-weights",
                      weights, "--no-progress", "--output", str(tmp_path / "r2.json")])
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-9) and res2["sfid"] == pytest.approx(res["sfid"], rel=1e-9)
    assert "precision" not in res2 and any("precision/recall skipped" in n for n in res2["notes"])
    assert res2["fid_sqrtm"]["reference_statistics"] == "precomputed in --ref"


def test_repa_eval_bad_inputs(weights, tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8), np.float32))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="uint8"):
        eval_main([str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights])
    with pytest.raises(SystemExit, match="--inception-weights"):
        eval_main([str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                   str(tmp_path / "missing.pth")])


def test_repa_eval_click_conventions(weights, tmp_path):
    from importlib.metadata import version

    from click.testing import CliRunner

    from repa.sampler.eval_cli import cli
    r = CliRunner()
    for flag in ("-h", "--help"):
        res = r.invoke(cli, [flag])
        assert res.exit_code == 0 and "--ref" in res.output and "default: 100" in res.output
        assert "repa-eval align" in res.output
    res = r.invoke(cli, ["--version"])
    assert res.exit_code == 0 and version("repa") in res.output
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    res = r.invoke(cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--batch", "4"])
    assert res.exit_code == 2 and "No such option" in res.output and "--batch" in res.output  # no abbreviations
    res = r.invoke(cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output
    with pytest.raises(SystemExit, match="--batch-size"):
        eval_main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--batch-size", "0"])


def test_repa_eval_dispatches_align(monkeypatch):
    """`repa-eval align ...` hands its argv (with the leading word) to repa.sampler.align; the real one answers -h."""
    from click.testing import CliRunner

    from repa.sampler import eval_cli
    seen = []
    monkeypatch.setattr(eval_cli, "align_cli", lambda argv=None: seen.append(list(argv)) or 0)
    res = CliRunner().invoke(eval_cli.cli, ["align", "CKPT", "--shards", "SET"])
    assert res.exit_code == 0 and seen == [["align", "CKPT", "--shards", "SET"]]
    monkeypatch.undo()
    res = CliRunner().invoke(eval_cli.cli, ["align", "-h"])
    assert res.exit_code == 0 and "CKNNA" in res.output and "--shards" in res.output
