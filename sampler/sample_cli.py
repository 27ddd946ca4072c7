"""``repa-sample``: checkpoint -> PNGs -> ADM ``.npz`` (+ JSON of the full configuration, + a grid PNG).

Flags follow the reference ``generate.py`` (docs/reference.md §9.2). Run it on one process, or on many with
``torchrun --nproc_per_node N -m repa.sampler.sample_cli ...`` / ``accelerate launch -m repa.sampler.sample_cli ...``
(on CPU use ``torchrun``: ``accelerate launch --cpu`` starts a single process). Every sample's noise and label
derive from its global index (see ``sampler/generate.py``), so the output does not depend on the number of
processes or the batch size, and an interrupted run resumes by skipping the PNGs already written.
The last line printed is the path of the ``.npz``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .generate import (DistInfo, LatentDecoder, SamplingSpec, barrier, finalize_outputs, generate_pngs,
                       init_distributed, make_labels, prepare_folder, spec_identity)
from .load import CheckpointError, load_sampling_model

REFERENCE_VAE_SCALE = 0.18215  # SD-VAE, docs/reference.md §3.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repa-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="repa-train checkpoint folder (or its checkpoints/ folder: newest step), a reference training "
                        ".pt (its 'ema' entry), a flat state-dict .pt such as the official last.pt, or 'official'")
    p.add_argument("--model", default=None, help="e.g. SiT-XL/2; for .pt files a check (the weights' shapes decide); "
                                                 "checkpoint folders carry their own")
    p.add_argument("--num-classes", type=int, default=None, help="check against the checkpoint (its label table)")
    p.add_argument("--encoder-depth", type=int, default=None, help="projector tap of .pt weights (default 8)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of non-standard-width .pt weights")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side; default: the checkpoint's (folders) or latent side x 8 (.pt)")
    p.add_argument("--vae", default=None,
                   help="decoder: ema|mse|none|HF id|local dir; default: the training VAE (folders), ema (.pt, as the "
                        "reference generate.py)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a training checkpoint")
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--mode", choices=["ode", "sde"], default="ode")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action="store_true", help="Heun correction (ODE only)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--path-type", choices=["linear", "cosine"], default=None,
                   help="interpolant for the SDE score; default: the checkpoint's, else linear")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--label-sampling", choices=["uniform", "balanced"], default="uniform",
                   help="uniform: i.i.d. labels (reference protocol); balanced: sample i gets class i mod K")
    p.add_argument("--class-ids", default=None, help="comma-separated class indices to sample from, e.g. 1,2,3")
    p.add_argument("--null-class", type=int, default=None,
                   help="CFG null label (default: the model's num_classes; the reference hard-codes 1000)")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=False,
                   help="SDPA attention (the reference generate.py uses the explicit softmax: off)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    p.add_argument("--legacy", action="store_true", help="rename decoder_blocks.* of old checkpoints")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--cache-dir", default=None, help="where --ckpt official is cached (default $REPA_CACHE or "
                                                     "~/.cache/repa)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_class_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"repa-sample: --class-ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise SystemExit("repa-sample: --class-ids is empty; give e.g. 1,2,3 or drop the flag")
    return ids


def _decoder_settings(args, config: dict, model) -> tuple[str, list, list, int]:
    """(vae spec, scale, bias, resolution) from the checkpoint config and the flags."""
    kw = config["model"]["kwargs"]
    data = config.get("data") or None
    if data:  # repa-train checkpoint: the latent space it was trained in
        vae_info = data.get("vae") or {}
        vae = args.vae or (vae_info.get("id") or "none")
        scale = vae_info.get("scale") or [1.0] * kw["in_channels"]
        bias = vae_info.get("bias") or [0.0] * kw["in_channels"]
        down = vae_info.get("downsample") or (1 if vae_info.get("id") is None else 8)
        res = data.get("resolution") or kw["input_size"] * down
        if args.resolution is not None and args.resolution != res:
            raise SystemExit(f"repa-sample: --resolution {args.resolution} does not match the checkpoint's {res} "
                             f"({config['source']['path']}/config.json); drop the flag")
        return vae, list(scale), list(bias), int(res)
    pixel = kw["in_channels"] == 3
    vae = args.vae or ("none" if pixel else "ema")
    c = kw["in_channels"]
    scale, bias = ([1.0] * c, [0.0] * c) if vae == "none" else ([REFERENCE_VAE_SCALE] * c, [0.0] * c)
    down = 1 if vae == "none" else 8
    res = args.resolution or kw["input_size"] * down
    if res != kw["input_size"] * down:
        raise SystemExit(f"repa-sample: --resolution {res} needs latent side {res // down}, but {args.ckpt} has "
                         f"{kw['input_size']}; use --resolution {kw['input_size'] * down}")
    return vae, scale, bias, res


def _folder_name(args, config: dict, res: int, vae: str, spec: SamplingSpec) -> str:
    """The reference's folder name, plus the settings it omits (steps, interval, Heun, labels)."""
    model = (config["model"]["name"] or "SiT").replace("/", "-")
    src = config["source"]
    if src["kind"] == "official":
        ck = "SiT-XL-2-256x256"
    elif src["kind"] == "repa-checkpoint":
        ck = os.path.basename(src["path"].rstrip(os.sep))
    else:
        ck = os.path.basename(src["path"]).removesuffix(".pt").removesuffix(".safetensors")
    vae_tag = os.path.basename(str(vae).rstrip("/")).replace("/", "-")
    name = f"{model}-{ck}-size-{res}-vae-{vae_tag}-cfg-{spec.cfg_scale}-seed-{spec.global_seed}-{spec.mode}"
    name += f"-{spec.num_steps}steps"
    if spec.guidance_low != 0.0:
        name += f"-low-{spec.guidance_low}"
    if spec.guidance_high != 1.0:
        name += f"-high-{spec.guidance_high}"
    if spec.heun and spec.mode == "ode":
        name += "-heun"
    if spec.label_sampling != "uniform":
        name += f"-{spec.label_sampling}"
    if spec.class_ids:
        name += "-classes-" + "_".join(map(str, spec.class_ids[:8])) + ("_etc" if len(spec.class_ids) > 8 else "")
    return name


def run(args, info: DistInfo) -> str | None:
    progress = not args.no_progress
    if args.per_proc_batch_size < 1:
        raise SystemExit(f"repa-sample: --per-proc-batch-size must be >= 1, got {args.per_proc_batch_size}")
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    try:
        model, config = load_sampling_model(
            args.ckpt, model_name=args.model, encoder_depth=args.encoder_depth, fused_attn=args.fused_attn,
            device=info.device, cache_dir=args.cache_dir, legacy=True if args.legacy else None,
            weights=args.weights, num_heads=args.num_heads)
    except CheckpointError as e:
        raise SystemExit(f"repa-sample: {e}") from None
    kw = config["model"]["kwargs"]
    # The REPA projector heads only feed the training loss; the velocity never depends on them. Dropping them
    # saves their matmuls at every step (2-6% of a SiT forward) without changing a single output value.
    if hasattr(model, "projectors"):
        model.projectors = torch.nn.ModuleList()
    if args.model and config["source"]["kind"] == "repa-checkpoint" and args.model != config["model"]["name"]:
        raise SystemExit(f"repa-sample: --model {args.model} but {config['source']['path']} holds "
                         f"{config['model']['name']}; drop --model")
    if args.num_classes is not None and args.num_classes != kw["num_classes"]:
        raise SystemExit(f"repa-sample: --num-classes {args.num_classes} but the checkpoint has "
                         f"{kw['num_classes']} classes; drop the flag")
    vae_spec, scale, bias, res = _decoder_settings(args, config, model)
    spec = SamplingSpec(
        num_samples=args.num_fid_samples, mode=args.mode, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
        guidance_low=args.guidance_low, guidance_high=args.guidance_high, heun=args.heun,
        path_type=args.path_type or kw.get("path_type") or "linear", global_seed=args.global_seed,
        label_sampling=args.label_sampling, class_ids=_parse_class_ids(args.class_ids),
        num_classes=kw["num_classes"], null_class=kw["num_classes"] if args.null_class is None else args.null_class,
        latent_shape=[kw["in_channels"], kw["input_size"], kw["input_size"]])
    try:
        spec.validate()
    except ValueError as e:
        raise SystemExit(f"repa-sample: {e}") from None
    from repa.preprocess.vae import load_vae
    vae = load_vae(vae_spec, info.device)
    decoder = LatentDecoder(vae, scale, bias, info.device)
    folder = os.path.join(args.sample_dir, _folder_name(args, config, res, vae_spec, spec))
    identity = spec_identity(spec, {"checkpoint": config["source"], "model": config["model"]["name"],
                                    "vae": vae_spec, "scale": scale, "bias": bias, "resolution": res,
                                    "fused_attn": bool(args.fused_attn)})
    prepare_folder(folder, identity, info)
    labels = make_labels(spec.num_samples, spec.global_seed, spec.num_classes, spec.class_ids, spec.label_sampling)
    t0 = time.perf_counter()
    done = generate_pngs(model, decoder, spec, folder, labels, info, args.per_proc_batch_size, progress)
    elapsed = time.perf_counter() - t0
    barrier(info)
    if info.rank != 0:
        return None
    record = {"command": " ".join(sys.argv), "args": vars(args), "checkpoint": config["source"],
              "model": config["model"], "vae": {"spec": vae_spec, "scale": scale, "bias": bias},
              "resolution": res, "world_size": info.world, "generated_by_rank0_this_run": done,
              "sampling_seconds": elapsed}
    return finalize_outputs(folder, spec, labels, record, progress)


def main(argv=None) -> str | None:
    args = build_parser().parse_args(argv)
    info = init_distributed(args.device)
    try:
        npz = run(args, info)
    finally:
        if info.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if npz is not None:
        print(npz, flush=True)
    return npz


def cli() -> int:
    """Console-script entry point: ``main`` returns the .npz path (for Python callers); the process exits 0."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
