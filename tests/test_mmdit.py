"""MMDiT parity with the official REPA models/mmdit.py, from data it recorded (tests/data/mmdit_README.md)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repa.trainer.loss import REPALoss
from repa.trainer.mmdit import ContextAsLabels, MMDiT, build_mmdit, mmdit_config

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def ref():
    with open(os.path.join(DATA, "mmdit_reference.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(DATA, "mmdit_reference.safetensors"))


def _official_model(ref, name):
    """Our MMDiT with the official weights of config ``name`` loaded strictly (pos_embed is our own)."""
    meta, tensors = ref
    model = MMDiT(**meta[name]["kwargs"])
    prefix = f"{name}.w."
    sd = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    sd["pos_embed"] = model.pos_embed.clone()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _checksum(sd):
    h, sums = hashlib.sha256(), {}
    for k in sorted(sd):
        a = sd[k].detach().float().contiguous().numpy()
        h.update(k.encode())
        h.update(a.tobytes())
        sums[k] = float(np.float64(a).sum())
    return h.hexdigest(), sums


def test_official_recipe_keys_and_shapes(ref):
    meta, _ = ref
    with torch.device("meta"):
        ours = build_mmdit("MMDiT-B/2", z_dims=[768])
    shapes = {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == meta["official_recipe"]["shapes"]
    assert sum(p.numel() for p in ours.parameters()) == meta["official_recipe"]["num_parameters"] == 512_415_504
    cfg = mmdit_config("MMDiT-B/2")
    assert (cfg["depth"], cfg["patch_size"], cfg["encoder_depth"], cfg["qk_norm"]) == (24, 2, 8, None)


@pytest.mark.parametrize("name", ["a", "b"])
def test_forward_matches_official(ref, name):
    meta, tensors = ref
    model = _official_model(ref, name)
    extra = {"y": tensors[f"{name}.y"].float()} if f"{name}.y" in tensors else {}
    with torch.no_grad():
        v, zs = model(tensors[f"{name}.x"].float(), tensors[f"{name}.t"], context=tensors[f"{name}.context"].float(),
                      **extra)
    assert len(zs) == 1
    assert (v - tensors[f"{name}.v"]).abs().max().item() <= 1e-5
    assert (zs[0] - tensors[f"{name}.z0"]).abs().max().item() <= 1e-5
    assert tensors[f"{name}.v"].abs().max().item() > 0.1  # the reference is not trivially zero


def test_seeded_init_matches_official(ref):
    """Same module order as the official, so manual_seed(0) gives the official initial weights."""
    meta, _ = ref
    torch.manual_seed(0)
    digest, _ = _checksum(MMDiT(**meta["a"]["kwargs"]).state_dict())
    assert digest == meta["a"]["init_seed0_sha256"]
    torch.manual_seed(0)
    _, sums = _checksum(MMDiT(**meta["b"]["kwargs"]).state_dict())
    official = meta["b"]["init_seed0_sums"]
    assert sums.keys() == official.keys()
    # the official leaves learnable RMSNorm weights uninitialised (torch.empty); ours start at 1
    for k in sums:
        if k.endswith(("ln_q.weight", "ln_k.weight")):
            assert sums[k] == 32.0
        else:
            assert sums[k] == pytest.approx(official[k], rel=1e-6, abs=1e-6), k


def test_repa_loss_matches_official_silos(ref):
    meta, tensors = ref
    model = _official_model(ref, "a")
    torch.manual_seed(meta["loss"]["seed"])
    with torch.no_grad():
        denoise, proj = REPALoss()(ContextAsLabels(model), tensors["a.x"].float(), tensors["a.context"].float(),
                                   [tensors["loss.z"]])
    assert denoise.tolist() == pytest.approx(meta["loss"]["denoising"], abs=1e-5)
    assert proj.item() == pytest.approx(meta["loss"]["proj"], abs=1e-6)


def test_bad_inputs_are_clear_errors():
    model = MMDiT(input_size=8, patch_size=2, depth=2, z_dims=[8], projector_dim=16, encoder_depth=1)
    x, t = torch.zeros(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match=r"context \(B, L, 768\)"):
        model(x, t)
    with pytest.raises(ValueError, match="built for 8x8 latents"):
        model(torch.zeros(1, 4, 16, 16), t, context=torch.zeros(1, 3, 768))
    with pytest.raises(ValueError, match=r"encoder_depth must be in \[1, depth=2\]"):
        MMDiT(input_size=8, depth=2, encoder_depth=3)
    with pytest.raises(ValueError, match="unknown model 'MMDiT-Q/2'"):
        mmdit_config("MMDiT-Q/2")
    with pytest.raises(ValueError, match="unknown MMDiT arguments"):
        mmdit_config("MMDiT-S/2", hidden_size=64)
    assert mmdit_config("MMDiT-d3/2")["depth"] == 3
    with pytest.raises(ValueError, match="force_drop_ids"):
        ContextAsLabels(model)(x, t, torch.zeros(1, 3, 768), force_drop_ids=torch.ones(1))


def test_grad_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    model = MMDiT(input_size=8, patch_size=2, depth=2, z_dims=[8], projector_dim=16, encoder_depth=1).train()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 768)
    grads = []
    for ckpt_on in (False, True):
        model.grad_checkpointing = ckpt_on
        model.zero_grad()
        v, zs = model(x, t, context=ctx)
        (v.square().mean() + zs[0].mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
