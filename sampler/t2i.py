"""Text-to-image sampling from an MMDiT checkpoint (repa-sample --prompts FILE | --prompts-from SET).

Prompts are encoded with the checkpoint's text encoder (its manifest provenance; ``--text-encoder``
overrides), the unconditional branch uses the encoding of the empty caption, and the ODE/SDE solvers are
the class-conditional ones (sampler/solvers.py, reference-exact): the model is wrapped so that a "label"
indexes a row of [prompt contexts; empty context] and the null class is the empty row. This is the
official ``samplers_t2i.py`` arithmetic (batch doubled as [x, x] with [context, empty], CFG inside
[guidance_low, guidance_high], float64 state).

Outputs in ``--sample-dir``: ``<name>/<index:06d>.png``, ``<name>.npz`` (ADM ``arr_0``), and
``<name>/prompts.json`` (index -> prompt, plus the record key for --prompts-from). Sample i's initial noise
(and SDE noise) derive from (seed, i) only, so output does not depend on the batch size, and a rerun skips
PNGs already written. The folder is claimed as repa-sample does (a lock against a second writer; a folder
of other prompts or settings, or not made by repa-sample, is refused).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from repa.preprocess.text_encoder import load_text_encoder
from repa.preprocess.vae import load_vae
from repa.shards import storage
from repa.trainer.mmdit import MMDiT

from .generate import STREAM_SDE, DistInfo, LatentDecoder, initial_noise, prepare_folder, sample_generator
from .npz import atomic_write_bytes, read_png, save_png, write_images_npz
from .solvers import euler_maruyama_sampler, euler_sampler

__all__ = ["read_prompts", "prompts_from_set", "reference_batch", "load_t2i_model", "ContextRows", "sample_t2i", "run_t2i"]

CAPTIONS_FILE = "captions.json"  # written by repa-preprocess next to the shards


def read_prompts(path: str) -> list[str]:
    """One prompt per line (UTF-8); an empty line is an error (it would silently sample unconditionally)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read it ({e})") from None
    prompts = [ln.strip() for ln in lines]
    for n, p in enumerate(prompts, 1):
        if not p:
            raise ValueError(f"--prompts {path}:{n} is empty; remove blank lines (one prompt per line)")
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts")
    return prompts


def prompts_from_set(set_dir: str, num: int | None = None, storage_options=None,
                     seed: int | None = None) -> list[tuple[int, str]]:
    """(record key, caption) pairs from a captioned shard set's captions.json.

    ``seed`` None: the first caption of the first ``num`` records by key. With a seed: ``num`` records drawn
    without replacement and one of each record's captions, uniformly (numpy default_rng(seed)): the
    U-ViT MS-COCO protocol of 30K prompts drawn from the val captions.
    """
    url = storage.join(set_dir, CAPTIONS_FILE)
    if storage.size(url, storage_options) is None:
        raise ValueError(f"--prompts-from {set_dir}: no {CAPTIONS_FILE} there; pass a shard set that "
                         "repa-preprocess wrote from a captioned source (coco:, captions:, hf: --caption-column)")
    caps = json.loads(storage.read_bytes(url, storage_options))["captions"]
    keys = sorted(int(k) for k in caps)
    num = len(keys) if num is None else num
    if num > len(keys):
        raise ValueError(f"--num-fid-samples {num}: {set_dir} has only {len(keys)} captioned records")
    if seed is None:
        return [(k, caps[str(k)][0]) for k in keys[:num]]
    rng = np.random.default_rng(seed)
    picked = [keys[i] for i in rng.choice(len(keys), size=num, replace=False)]
    return [(k, caps[str(k)][int(rng.integers(len(caps[str(k)])))]) for k in picked]


def reference_batch(source, res: int, out_npz: str, keys=None) -> str:
    """ADM-style reference .npz of a captioned source's images at ``res`` (its crop: ADM, or U-ViT's when
    ``source.crop == "uvit"``), in key order (or the given ``keys``): the real side of an MS-COCO val FID."""
    keys = list(range(len(source))) if keys is None else [int(k) for k in keys]
    if getattr(source, "res", None) is None:
        source.res = res  # a source with crop "uvit" crops to res itself; the ADM crop is then the identity
    return write_images_npz(out_npz, len(keys), (res, res, 3), lambda i: source.image(keys[i], res))


def load_t2i_model(ckpt: str, weights: str = "ema", device="cpu"):
    """(MMDiT in eval mode, config.json dict) from a repa-train checkpoint folder of a t2i run."""
    from safetensors.torch import load_file
    path = os.path.join(ckpt, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--ckpt {ckpt}: no config.json; pass a repa-train checkpoint folder (<exp>/checkpoints/<step>)")
    with open(path) as f:
        config = json.load(f)
    name = config.get("model", {}).get("name", "")
    if not str(name).startswith("MMDiT-"):
        raise ValueError(f"--ckpt {ckpt}: model {name!r} is not a text-to-image MMDiT; --prompts needs a checkpoint "
                         "trained on captioned shards (sample class-conditional models without --prompts)")
    model = MMDiT(**config["model"]["kwargs"])
    model.load_state_dict(load_file(os.path.join(ckpt, f"{weights}.safetensors")), strict=True)
    return model.float().to(device).eval().requires_grad_(False), config


class ContextRows(torch.nn.Module):
    """Adapter for the class-conditional solvers: label i -> row i of ``table`` (B+1 contexts, the last one
    the empty caption), passed to the MMDiT as ``context``."""

    def __init__(self, model, contexts: torch.Tensor, empty: torch.Tensor):
        super().__init__()
        self.model = model
        self.table = torch.cat([contexts, empty[None].to(contexts)], dim=0)
        self.null_class = len(contexts)

    def forward(self, x, t, y):
        return self.model(x, t, context=self.table[y])


@torch.no_grad()
def sample_t2i(model, contexts, empty, noise, *, mode: str = "ode", num_steps: int = 50, cfg_scale: float = 4.0,
               guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False, path_type: str = "linear",
               noise_generators=None) -> torch.Tensor:
    """float64 latents at t = 0 for (B, L, H) ``contexts`` from ``noise`` (B, C, H', W')."""
    rows = ContextRows(model, contexts, empty)
    labels = torch.arange(len(contexts), device=contexts.device)
    kw = dict(num_steps=num_steps, heun=heun, cfg_scale=cfg_scale, guidance_low=guidance_low,
              guidance_high=guidance_high, path_type=path_type, null_class=rows.null_class)
    if mode == "ode":
        return euler_sampler(rows, noise, labels, **kw)
    if mode == "sde":
        return euler_maruyama_sampler(rows, noise, labels, noise_generators=noise_generators, **kw)
    raise ValueError(f"--mode must be ode or sde, got {mode!r}")


def _text_encoder_spec(config: dict, override: str | None) -> str:
    if override:
        return override
    text = (config.get("data") or {}).get("text") or {}
    enc = text.get("text_encoder") or {}
    spec = enc.get("id") or enc.get("name")
    if not spec:
        raise ValueError("the checkpoint's data provenance names no text encoder; pass --text-encoder")
    return spec


def _write_index(folder: str, index: dict) -> None:
    """prompts.json: index -> prompt (and record key); the folder's claim record holds the same identity."""
    path = os.path.join(folder, "prompts.json")
    if not os.path.isfile(path):
        atomic_write_bytes(path, json.dumps(index, indent=1).encode())


def run_t2i(ckpt: str, prompts: list[str], sample_dir: str, *, keys=None, text_encoder: str | None = None,
            decoder=None, mode: str = "ode", num_steps: int = 50, cfg_scale: float = 4.0,
            guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False, seed: int = 0,
            batch_size: int = 32, device="cpu", weights: str = "ema", name: str | None = None) -> str:
    """Sample one image per prompt; returns the .npz path. ``decoder``: latents -> uint8 NHWC (default: the
    checkpoint's VAE via repa.sampler.generate.LatentDecoder)."""
    model, config = load_t2i_model(ckpt, weights, device)
    kw = config["model"]["kwargs"]
    encoder = load_text_encoder(_text_encoder_spec(config, text_encoder), device)
    empty = encoder.encode([""])[0].to(device)
    decoder = decoder or _default_decoder(config, device)
    settings = dict(mode=mode, num_steps=num_steps, cfg_scale=cfg_scale, guidance_low=guidance_low,
                    guidance_high=guidance_high, heun=heun, seed=seed, weights=weights,
                    path_type=(config.get("args") or {}).get("path_type", "linear"))
    name = name or f"t2i-{mode}-{num_steps}-cfg-{cfg_scale}-seed-{seed}"
    folder = os.path.join(sample_dir, name)
    index = {"ckpt": os.path.abspath(ckpt), "settings": settings,
             "prompts": {str(i): ({"prompt": p, "key": int(keys[i])} if keys is not None else p)
                         for i, p in enumerate(prompts)}}
    # repa-sample's folder claim: a lock against a second writer, refusal of foreign folders and of other
    # prompts/settings, removal of a killed run's temp files
    lock = prepare_folder(folder, index, DistInfo(device=torch.device(device)))
    try:
        _write_index(folder, index)
        _sample_missing(model, encoder, empty, decoder, prompts, folder, settings, seed, batch_size, device,
                        (kw["in_channels"], kw["input_size"], kw["input_size"]))
        first = read_png(os.path.join(folder, "000000.png"))
        return write_images_npz(f"{folder}.npz", len(prompts), first.shape,
                                lambda i: read_png(os.path.join(folder, f"{i:06d}.png")))
    finally:
        if lock is not None:
            lock.release()


def _sample_missing(model, encoder, empty, decoder, prompts, folder, settings, seed, batch_size, device, shape):
    """Sample and save every prompt whose PNG is not in ``folder`` yet, in batches."""
    todo = [i for i in range(len(prompts)) if not os.path.isfile(os.path.join(folder, f"{i:06d}.png"))]
    for start in range(0, len(todo), batch_size):
        idx = todo[start: start + batch_size]
        ctx = encoder.encode([prompts[i] for i in idx]).to(device)
        gens = [sample_generator(seed, i, STREAM_SDE) for i in idx] if settings["mode"] == "sde" else None
        z = sample_t2i(model, ctx, empty, initial_noise(idx, seed, shape).to(device),
                       noise_generators=gens, **{k: settings[k] for k in
                                                 ("mode", "num_steps", "cfg_scale", "guidance_low", "guidance_high",
                                                  "heun", "path_type")})
        for i, img in zip(idx, decoder(z.float())):
            save_png(os.path.join(folder, f"{i:06d}.png"), img)


def _default_decoder(config: dict, device):
    vae = (config.get("data") or {}).get("vae") or {}
    c = int(config["model"]["kwargs"]["in_channels"])
    return LatentDecoder(load_vae(vae.get("id") or "none", device), vae.get("scale", [1.0] * c),
                         vae.get("bias", [0.0] * c), device)


_DEFAULT_NUM_FID_SAMPLES = 50_000  # repa-sample's default: with --prompts-from it means "every record"


def run_from_args(args, info) -> str:
    """``repa-sample --prompts FILE | --prompts-from SET`` (one process); bad input exits with a message."""
    try:
        if info.world > 1:
            raise ValueError("--prompts/--prompts-from run on one process; start repa-sample without torchrun")
        if args.prompts and args.prompts_from:
            raise ValueError("give --prompts or --prompts-from, not both")
        keys = None
        if args.prompts:
            prompts = read_prompts(args.prompts)
        else:
            num = None if args.num_fid_samples == _DEFAULT_NUM_FID_SAMPLES else args.num_fid_samples
            pairs = prompts_from_set(args.prompts_from, num, seed=args.global_seed)
            keys, prompts = [k for k, _ in pairs], [p for _, p in pairs]
        decoder = None
        if args.vae:
            decoder = _decoder_override(args.ckpt, args.vae, info.device)
        return run_t2i(args.ckpt, prompts, args.sample_dir, keys=keys, text_encoder=args.text_encoder,
                       decoder=decoder, mode=args.mode, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                       guidance_low=args.guidance_low, guidance_high=args.guidance_high, heun=args.heun,
                       seed=args.global_seed, batch_size=args.per_proc_batch_size, device=info.device,
                       weights=args.weights)
    except (ValueError, OSError) as e:
        raise SystemExit(f"repa-sample: {e}") from None


def _decoder_override(ckpt: str, vae_spec: str, device):
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    vae = (config.get("data") or {}).get("vae") or {}
    c = int(config["model"]["kwargs"]["in_channels"])
    return LatentDecoder(load_vae(vae_spec, device), vae.get("scale", [1.0] * c), vae.get("bias", [0.0] * c), device)
