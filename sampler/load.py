"""Load a SiT for sampling from any of the checkpoint kinds the project meets, never unpickling code.

``load_sampling_model(path, ...) -> (model, config)`` accepts

* a checkpoint directory written by ``repa-train`` (``config.json`` + ``ema.safetensors``; docs/CONTRACTS.md),
  or a ``checkpoints/`` folder holding several (the highest step is used);
* a reference training checkpoint ``NNNNNNN.pt``: ``{"model", "ema", "opt", "args", "steps"}``; the ``ema``
  entry is used. Its ``args`` is an ``argparse.Namespace``, which ``torch.load(weights_only=True)`` refuses by
  default; we allow exactly that one harmless class (``torch.serialization.safe_globals``) and nothing else;
* a flat state dict ``.pt`` (``.safetensors`` too) such as the official REPA SiT-XL/2 ``last.pt``;
* the word ``official``: ``<cache>/last.pt`` (cache = ``$REPA_CACHE`` or ``~/.cache/repa``), downloaded from
  the REPA authors' link where the network allows; otherwise a fast failure saying where to put the file.

For ``.pt``/``.safetensors`` weights the architecture is read off the tensor shapes (depth, width, patch,
latent size, channels, classes, projector dims, qk-norm), ``num_heads`` from ``--model`` or the standard
width -> heads table, and ``encoder_depth`` (not visible in the weights; it only places the projector tap)
from the checkpoint's ``args``, the ``encoder_depth`` argument, or 8 (the reference default).
Loading is strict. The returned model is in eval mode with ``requires_grad`` off.

``config`` has the checkpoint-directory layout: ``{"model": {"name", "kwargs"}, "data": provenance | None,
"source": {"kind", "path", "step"}, ...}``; ``data`` is None for reference/official weights (the sampler then
uses the reference's SD-VAE defaults).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pickle
import re
import sys

import torch

from repa.preprocess.hub import ModelDownloadError, download_file
from repa.preprocess.hub import cache_dir as repa_cache_dir
from repa.trainer.models import SiT, SiT_ARCHS

__all__ = ["load_sampling_model", "safe_torch_load", "infer_sit_kwargs", "CheckpointError", "OFFICIAL_URL",
           "official_checkpoint_path", "state_dict_sha256"]

# The URL REPA's utils.download_model fetches for the released SiT-XL/2 (4M iterations) checkpoint.
OFFICIAL_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
                "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0")
OFFICIAL_KWARGS = dict(input_size=32, z_dims=[768], encoder_depth=8, qk_norm=False)  # docs/reference.md §1.2
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # docs/reference.md §1.1
OFFICIAL_SHA256 = None  # not published by the authors; REPA_OFFICIAL_SHA256 pins one


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says what to do."""


def _cache_dir(cache_dir: str | None) -> str:
    return cache_dir or repa_cache_dir()


def official_checkpoint_path(cache_dir: str | None = None) -> str:
    return os.path.join(_cache_dir(cache_dir), "last.pt")


def _download_official(dest: str, timeout: float) -> None:
    """The released checkpoint, atomically; its SHA-256 is checked when one is known. The authors publish none,
    so set ``REPA_OFFICIAL_SHA256`` to pin the file you trust; the strict 298-key load checks the layout."""
    print(f"downloading the official REPA SiT-XL/2 checkpoint to {dest}", file=sys.stderr, flush=True)
    try:
        download_file(OFFICIAL_URL, dest, sha256=os.environ.get("REPA_OFFICIAL_SHA256") or OFFICIAL_SHA256,
                      what="the official REPA SiT-XL/2 checkpoint", timeout=timeout)
    except ModelDownloadError as e:
        raise CheckpointError(
            f"--ckpt official: could not download the official REPA SiT-XL/2 checkpoint ({e}). Download last.pt "
            f"by hand from {OFFICIAL_URL} (the REPA README's link) and put it at {dest} (or set REPA_CACHE to "
            f"the folder holding last.pt), or pass --ckpt /path/to/last.pt") from e


def safe_torch_load(path: str):
    """``torch.load(path, weights_only=True)`` with ``argparse.Namespace`` allowed; clear error otherwise."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        culprit = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to unpickle: the file contains objects{culprit} other than tensors, containers and "
            f"argparse.Namespace, and loading it could run arbitrary code. Only load checkpoints you trust; "
            f"convert it to a plain state dict (or safetensors) in a trusted environment.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e


def state_dict_sha256(sd: dict) -> str:
    """SHA-256 over the sorted keys, dtypes, shapes and raw bytes of a state dict: the identity of the weights.

    Hashing the tensors (not the file) gives one answer for every checkpoint kind and names exactly what was
    loaded; it reads each byte once (about a second per GB), small next to sampling itself.
    """
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(f"{k}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _experiment_of(ckpt: str, config: dict) -> str:
    """The repa-train experiment a checkpoint folder belongs to: its recorded --exp-name, else the folder above
    ``checkpoints/`` (``<output_dir>/<exp_name>/checkpoints/<step>``), else the checkpoint folder's name."""
    name = (config.get("args") or {}).get("exp_name") if isinstance(config.get("args"), dict) else None
    if name:
        return str(name)
    parent = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(parent) == "checkpoints":
        return os.path.basename(os.path.dirname(parent))
    return os.path.basename(os.path.abspath(ckpt))


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _rename_legacy(sd: dict, encoder_depth: int) -> dict:
    """Old checkpoints call the blocks after the tap point ``decoder_blocks.j``; they are ``blocks.{j+depth}``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"decoder_blocks\.(\d+)\.(.*)", k)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k] = v
    return out


def infer_sit_kwargs(sd: dict, *, model_name: str | None = None, encoder_depth: int | None = None,
                     num_heads: int | None = None, where: str = "checkpoint") -> tuple[str, dict]:
    """SiT constructor kwargs (and a registry name) that reproduce the shapes of state dict ``sd``."""

    try:
        hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
        tokens = sd["pos_embed"].shape[1]
        n_cls = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise CheckpointError(f"{where}: not a SiT state dict (missing {e}); expected the official key layout "
                              f"(docs/reference.md §1.2)") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = int(round(tokens ** 0.5))
    z_dims, k = [], 0
    while f"projectors.{k}.4.weight" in sd:
        z_dims.append(int(sd[f"projectors.{k}.4.weight"].shape[0]))
        k += 1
    projector_dim = int(sd["projectors.0.0.weight"].shape[0]) if z_dims else 2048
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    arch = next((a for a, c in SiT_ARCHS.items() if c["hidden_size"] == hidden and c["depth"] == depth), None)
    if model_name is not None:
        m = re.fullmatch(r"SiT-(\w+)/(\d+)", model_name)
        if not m or m.group(1) not in SiT_ARCHS:
            raise CheckpointError(f"--model {model_name!r}: unknown; use e.g. SiT-XL/2")
        want = SiT_ARCHS[m.group(1)]
        if (want["hidden_size"], want["depth"], int(m.group(2))) != (hidden, depth, patch):
            raise CheckpointError(
                f"--model {model_name} does not match {where}: the weights have depth {depth}, width {hidden}, "
                f"patch {patch}" + (f" (SiT-{arch}/{patch})" if arch else "") + "; fix --model or drop it")
        num_heads = num_heads or want["num_heads"]
    elif num_heads is not None:
        pass
    elif arch is not None:
        num_heads = SiT_ARCHS[arch]["num_heads"]
    elif hidden in _HEADS_BY_WIDTH:
        num_heads = _HEADS_BY_WIDTH[hidden]
    else:
        raise CheckpointError(f"{where}: non-standard width {hidden}; cannot infer the number of heads; pass "
                              f"--num-heads")
    name = f"SiT-{arch}/{patch}" if arch else f"SiT-custom-d{depth}-w{hidden}/{patch}"
    ed = 8 if encoder_depth is None else int(encoder_depth)
    ed = min(ed, depth) if encoder_depth is None else ed
    kwargs = dict(input_size=grid * patch, patch_size=int(patch), in_channels=int(in_ch), hidden_size=int(hidden),
                  decoder_hidden_size=int(hidden), depth=depth, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
                  encoder_depth=ed, num_classes=int(n_cls), z_dims=z_dims or [768], projector_dim=projector_dim,
                  qk_norm="blocks.0.attn.q_norm.weight" in sd)
    return name, kwargs


def _build(kwargs: dict, sd: dict, where: str, fused_attn: bool | None, device):

    kwargs = dict(kwargs)
    if fused_attn is not None:
        kwargs["fused_attn"] = bool(fused_attn)
    with torch.device("meta"):
        model = SiT(**kwargs)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not match the model {kwargs}: {e}") from None
    model = model.float().to(device).eval().requires_grad_(False)
    return model, kwargs


def _latest_checkpoint_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    subs = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isfile(os.path.join(d, "config.json"))
                  and os.path.basename(d).isdigit())
    if not subs:
        raise CheckpointError(f"--ckpt {path}: a directory without config.json (nor step folders holding one); "
                              f"pass a repa-train checkpoint folder like <exp>/checkpoints/0400000")
    return subs[-1]


def _read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError (truncated/garbled header) or an I/O error
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                              f"damaged or incomplete: use another checkpoint") from None


def _load_dir(path: str, fused_attn, device, weights: str):
    ckpt = _latest_checkpoint_dir(path)
    cfg_path = os.path.join(ckpt, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        kwargs = dict(config["model"]["kwargs"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a repa-train config.json ({e!r}); expected "
                              f'{{"model": {{"name", "kwargs"}}, "data": ...}}') from None
    wpath = os.path.join(ckpt, f"{weights}.safetensors")
    if not os.path.isfile(wpath):
        raise CheckpointError(f"{wpath}: missing; a repa-train checkpoint folder holds {weights}.safetensors")
    sd = _read_safetensors(wpath)
    digest = state_dict_sha256(sd)
    model, kwargs = _build(kwargs, sd, wpath, fused_attn, device)
    config = dict(config)
    config["model"] = {"name": config["model"].get("name"), "kwargs": kwargs}
    config["source"] = {"kind": "repa-checkpoint", "path": os.path.abspath(ckpt), "weights": f"{weights}.safetensors",
                        "step": config.get("step"), "experiment": _experiment_of(ckpt, config),
                        "weights_sha256": digest}
    return model, config


def load_sampling_model(path: str, *, model_name: str | None = None, encoder_depth: int | None = None,
                        fused_attn: bool | None = None, device="cpu", cache_dir: str | None = None,
                        legacy: bool | None = None, weights: str = "ema", num_heads: int | None = None,
                        download_timeout: float = 30.0):
    """Load ``path`` (see module docstring) -> ``(model, config)``.

    model_name / encoder_depth / num_heads: checks and hints for weight files (ignored for checkpoint dirs, whose config.json
    is authoritative). fused_attn: None keeps the stored setting (dirs) / the SiT default; the reference's
    generate.py uses False. legacy: rename ``decoder_blocks.*`` (None = auto-detect). weights: "ema" or "model"
    for checkpoint dirs and reference training checkpoints.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    kind = "weights"
    if path == "official":
        path, kind = official_checkpoint_path(cache_dir), "official"
        if not os.path.isfile(path):
            _download_official(path, download_timeout)
    if os.path.isdir(path):
        return _load_dir(path, fused_attn, device, weights)
    if not os.path.isfile(path):
        raise CheckpointError(f"--ckpt {path}: no such file or directory; pass a repa-train checkpoint folder, a "
                              f"reference .pt, a flat state-dict .pt, or 'official'")
    if path.endswith(".safetensors"):
        obj = _read_safetensors(path)
    else:
        obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict with an 'ema' entry, got {type(obj).__name__}")
    step, args = None, None
    if weights in obj and isinstance(obj[weights], dict):  # reference training checkpoint
        kind = "reference-train" if kind == "weights" else kind
        step, args = obj.get("steps"), obj.get("args")
        sd = obj[weights]
    elif "ema" in obj and isinstance(obj["ema"], dict):
        raise CheckpointError(f"{path}: has no {weights!r} entry")
    else:
        sd = obj
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: the state dict holds non-tensor values; not a SiT checkpoint")
    sd = _strip_prefixes(sd)
    arg = (lambda k: getattr(args, k, None)) if args is not None else (lambda k: None)
    if encoder_depth is None:
        encoder_depth = arg("encoder_depth")
    if model_name is None:
        model_name = arg("model")
    if kind == "official":
        model_name = model_name or "SiT-XL/2"
        encoder_depth = encoder_depth or OFFICIAL_KWARGS["encoder_depth"]
    if legacy or (legacy is None and any(k.startswith("decoder_blocks.") for k in sd)):
        sd = _rename_legacy(sd, 8 if encoder_depth is None else encoder_depth)
    name, kwargs = infer_sit_kwargs(sd, model_name=model_name, encoder_depth=encoder_depth,
                                    num_heads=num_heads, where=path)
    kwargs["fused_attn"] = False if fused_attn is None else bool(fused_attn)
    if arg("path_type"):
        kwargs["path_type"] = arg("path_type")
    digest = state_dict_sha256(sd)
    model, kwargs = _build(kwargs, sd, path, fused_attn, device)
    config = {"model": {"name": name, "kwargs": kwargs}, "data": None,
              "source": {"kind": kind, "path": os.path.abspath(path), "step": step, "weights": weights if
                         kind == "reference-train" else None, "weights_sha256": digest}}
    if args is not None:
        config["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return model, config
