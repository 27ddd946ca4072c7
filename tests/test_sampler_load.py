"""load_sampling_model: flat official-style state dict, reference training checkpoint, refusals."""
import argparse
import os

import pytest
import torch

from repa.sampler import load as load_mod
from repa.sampler.load import CheckpointError, load_sampling_model

KW = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, encoder_depth=2,
          num_classes=10, z_dims=[16, 8], projector_dim=32)


@pytest.fixture(scope="module")
def model():
    from repa.trainer.models import SiT
    torch.manual_seed(0)
    m = SiT(**KW)
    for p in m.parameters():
        p.data.normal_()
    return m.eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _check_forward(m, mm):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y)[0], mm(x, t, y)[0])


def test_flat_state_dict(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "last.pt")
    mm, cfg = load_sampling_model(str(tmp_path / "last.pt"), num_heads=4, encoder_depth=2)
    assert _same(model, mm) and not mm.training
    k = cfg["model"]["kwargs"]
    assert (k["depth"], k["hidden_size"], k["input_size"], k["num_classes"], k["z_dims"]) == (3, 64, 8, 10, [16, 8])
    assert k["fused_attn"] is False  # the reference generate.py's setting
    _check_forward(model, mm)
    # strict: a missing key is an error naming the file
    sd = model.state_dict()
    sd.pop("final_layer.linear.bias")
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_sampling_model(str(tmp_path / "broken.pt"), num_heads=4)
    with pytest.raises(CheckpointError, match="--model"):
        load_sampling_model(str(tmp_path / "last.pt"), model_name="SiT-XL/2")


def test_reference_training_checkpoint_with_namespace(model, tmp_path):
    args = argparse.Namespace(model=None, encoder_depth=2, path_type="linear", resolution=64, qk_norm=False)
    live = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": live, "ema": model.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": args, "steps": 400000}, tmp_path / "0400000.pt")
    mm, cfg = load_sampling_model(str(tmp_path / "0400000.pt"), num_heads=4)
    assert _same(model, mm)  # the EMA weights, not "model"
    assert cfg["source"] == {"kind": "reference-train", "path": str(tmp_path / "0400000.pt"), "step": 400000,
                             "weights": "ema", "weights_sha256": load_mod.state_dict_sha256(model.state_dict())}
    assert cfg["model"]["kwargs"]["encoder_depth"] == 2 and cfg["args"]["resolution"] == 64


def test_malicious_pickle_refused(model, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"ema": model.state_dict(), "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_sampling_model(str(tmp_path / "evil.pt"), num_heads=4)
    assert not marker.exists()


def test_official_fails_fast_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(load_mod, "OFFICIAL_URL", "http://127.0.0.1:9/last.pt")  # nothing listens on port 9
    with pytest.raises(CheckpointError, match=r"put it at .*last\.pt"):
        load_sampling_model("official", cache_dir=str(tmp_path), download_timeout=5)
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_damaged_safetensors_is_a_clear_error(model, tmp_path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])  # a copy that was cut short
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_sampling_model(str(tmp_path / "cut.safetensors"), num_heads=4)
    mm, cfg = load_sampling_model(str(tmp_path / "w.safetensors"), num_heads=4, encoder_depth=2)
    assert _same(model, mm) and cfg["source"]["weights_sha256"] == load_mod.state_dict_sha256(model.state_dict())
