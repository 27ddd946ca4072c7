"""Records tests/data/mmdit_reference.{json,safetensors} from the OFFICIAL REPA models/mmdit.py and loss.py.

Not a test and not shipped code: it imports the official files from a checkout given on the command line
(nothing of theirs is copied into this repository). Usage, from the repository root:

    PYTHONPATH=<dir with einops> python tests/data/mmdit_make_reference.py <REPA checkout> <commit>

where <REPA checkout> holds ``models/mmdit.py``, ``loss.py`` and ``samplers_t2i.py`` (github.com/sihyun-yu/REPA; the official
mmdit.py imports ``transformers`` and ``einops``). It records, for two tiny seeded configs, the official
weights (rounded to float16, so the fp16 file holds them exactly), inputs and outputs, the official
seeded initial weights' checksums, one official SILoss evaluation, official t2i ODE/SDE samples, and the key list + shapes of the
official recipe model ``MMDiT(input_size=32, z_dims=[768], encoder_depth=8)``.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

CONFIGS = {  # kwargs of the official MMDiT constructor (a 16x16 token grid: its pos_embed crop needs it)
    "a": dict(input_size=16, patch_size=1, depth=2, mlp_ratio=2.0, z_dims=[16], projector_dim=32, encoder_depth=1),
    "b": dict(input_size=16, patch_size=1, depth=1, z_dims=[16], projector_dim=32, encoder_depth=1, swiglu=True,
              rmsnorm=True, qk_norm="rms", scale_mod_only=True, register_length=2, adm_in_channels=8),
}
CONTEXT_LEN = 7


def checksum(sd):
    """sha256 over the float32 bytes of every tensor in key order, plus per-key sums (to name a mismatch)."""
    h = hashlib.sha256()
    sums = {}
    for k in sorted(sd):
        a = sd[k].detach().float().contiguous().numpy()
        h.update(k.encode())
        h.update(a.tobytes())
        sums[k] = float(np.float64(a).sum())
    return h.hexdigest(), sums


def record(MMDiT, name, kw, tensors, meta):
    torch.manual_seed(0)
    model = MMDiT(**kw)
    init_hash, init_sums = checksum(model.state_dict())
    g = torch.Generator().manual_seed(1)
    # pos_embed stays the official sin-cos table and is not stored: loading ours checks it through the outputs
    sd = {k: (v if k == "pos_embed" else (0.1 * torch.randn(v.shape, generator=g)).half().float())
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 4, 16, 16, generator=g).half().float()
    t = torch.tensor([0.25, 0.8])
    ctx = torch.randn(2, CONTEXT_LEN, 768, generator=g).half().float()
    extra = {"y": torch.randn(2, kw["adm_in_channels"], generator=g).half().float()} if kw.get("adm_in_channels") else {}
    with torch.no_grad():
        v, zs = model(x, t, context=ctx, **extra)
    tensors.update({f"{name}.w.{k}": v_.half() for k, v_ in sd.items() if k != "pos_embed"})
    tensors.update({f"{name}.x": x.half(), f"{name}.t": t, f"{name}.context": ctx.half(), f"{name}.v": v,
                    f"{name}.z0": zs[0]})
    tensors.update({f"{name}.{k}": v_.half() for k, v_ in extra.items()})
    meta[name] = {"kwargs": kw, "init_seed0_sha256": init_hash, "init_seed0_sums": init_sums}
    return model, x, ctx, g


def record_loss(SILoss, model, x, ctx, g, tensors, meta):
    """One official loss evaluation: t and noise come from the global RNG after manual_seed(123)."""
    z = torch.randn(2, 256, 16, generator=g)
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    torch.manual_seed(123)
    with torch.no_grad():
        denoise, proj = loss_fn(model, x, dict(context=ctx), zs=[z])
    tensors["loss.z"] = z
    meta["loss"] = {"config": "a", "seed": 123, "denoising": denoise.tolist(), "proj": float(proj)}


def record_samplers(samplers, model, x, ctx, g, tensors, meta):
    """Official t2i ODE (Heun) and SDE samples: CFG 4 inside [0, 0.7] against a random null context."""
    null = torch.randn(1, CONTEXT_LEN, 768, generator=g).half().float().repeat(2, 1, 1)
    kw = dict(num_steps=4, cfg_scale=4.0, guidance_low=0.0, guidance_high=0.7)
    ode = samplers.euler_sampler(model, x, ctx, null, heun=True, **kw)
    torch.manual_seed(7)
    sde = samplers.euler_maruyama_sampler(model, x, ctx, null, **kw)
    tensors.update({"sample.null": null[0].half(), "sample.ode": ode, "sample.sde": sde})
    meta["samplers"] = {"config": "a", "kwargs": kw, "ode_heun": True, "sde_seed": 7}


def main(repo, commit):
    sys.path.insert(0, repo)
    from models.mmdit import MMDiT  # noqa: official code, from the checkout given on the command line
    from loss import SILoss
    import samplers_t2i
    tensors, meta = {}, {"source": f"github.com/sihyun-yu/REPA@{commit} models/mmdit.py, loss.py, samplers_t2i.py",
                         "torch": torch.__version__}
    model_a, x, ctx, g = record(MMDiT, "a", CONFIGS["a"], tensors, meta)
    record(MMDiT, "b", CONFIGS["b"], tensors, meta)
    record_loss(SILoss, model_a, x, ctx, g, tensors, meta)
    record_samplers(samplers_t2i, model_a, x, ctx, g, tensors, meta)
    with torch.device("meta"):
        full = MMDiT(input_size=32, z_dims=[768], encoder_depth=8)
    meta["official_recipe"] = {"kwargs": dict(input_size=32, z_dims=[768], encoder_depth=8),
                               "shapes": {k: list(v.shape) for k, v in full.state_dict().items()},
                               "num_parameters": sum(p.numel() for p in full.parameters())}
    save_file({k: v.contiguous() for k, v in tensors.items()}, "tests/data/mmdit_reference.safetensors")
    os.chmod("tests/data/mmdit_reference.safetensors", 0o644)
    with open("tests/data/mmdit_reference.json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
