"""``repa-sample``: checkpoint -> PNGs -> ADM ``.npz`` (+ JSON of the full configuration, + a grid PNG).

Flags follow the reference ``generate.py`` (docs/reference.md §9.2). Run it on one process, or on many with
``torchrun --nproc_per_node N -m repa.sampler.sample_cli ...`` / ``accelerate launch -m repa.sampler.sample_cli ...``
(on CPU use ``torchrun``: ``accelerate launch --cpu`` starts a single process). Every sample's noise and label
derive from its global index (see ``sampler/generate.py``), so the output does not depend on the number of
processes or the batch size, and an interrupted run resumes by skipping the PNGs already written.
The last line printed is the path of the ``.npz``.
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import click
import torch
from click.core import ParameterSource

from repa.preprocess.vae import load_vae
from repa.shards.lock import LockHeld

from .generate import (DistInfo, FolderRefused, LatentDecoder, SamplingSpec, StopSignals, any_rank, barrier,
                       finalize_outputs, generate_pngs, init_distributed, make_labels, png_path, prepare_folder,
                       spec_identity)
from .load import CheckpointError, _latest_checkpoint_dir, load_sampling_model
from .t2i import run_from_args

REFERENCE_VAE_SCALE = 0.18215  # SD-VAE, docs/reference.md §3.2
DEFAULT_CFG_SCALE = 1.5  # the reference generate.py's default


class _Command(click.Command):
    """Refusals of the sample folder (another run holds it, not ours, other settings) end with a clear message
    on the command line; Python callers of :func:`main` get the exception itself."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (FolderRefused, LockHeld) as e:
            if (ctx.obj or {}).get("python_api"):
                raise
            raise click.ClickException(str(e)) from None


_CKPT_HELP = ("repa-train checkpoint folder (or its checkpoints/ folder: newest step), a reference training .pt "
              "(its 'ema' entry), a flat state-dict .pt such as the official last.pt, or 'official'")
_VAE_HELP = ("decoder: ema|mse|none|HF id|local dir; default: the training VAE (checkpoint folders), ema (.pt, as "
             "the reference generate.py)")


def _options(f):
    """The flags (reference generate.py names, docs/reference.md §9.2; its underscore spellings as aliases)."""
    opts = [
        click.option("--ckpt", required=True, help=_CKPT_HELP),
        click.option("--model", default=None, help="e.g. SiT-XL/2; for .pt files a check (the weights' shapes "
                     "decide); checkpoint folders carry their own"),
        click.option("--num-classes", type=int, default=None, help="check against the checkpoint (its label table)"),
        click.option("--encoder-depth", type=int, default=None, help="projector tap of .pt weights (default 8)"),
        click.option("--num-heads", type=int, default=None, help="attention heads of non-standard-width .pt weights"),
        click.option("--projector-embed-dims", default=None, help="check, e.g. 768: the projector output dims "
                     "(the weights decide)"),
        click.option("--qk-norm/--no-qk-norm", default=None, help="check: QK-norm in the weights"),
        click.option("--resolution", type=click.IntRange(min=1), default=None,
                     help="image side; default: the checkpoint's (folders) or latent side x 8 (.pt)"),
        click.option("--vae", default=None, help=_VAE_HELP),
        click.option("--weights", type=click.Choice(["ema", "model"]), default="ema",
                     help="which weights of a training checkpoint"),
        click.option("--num-fid-samples", type=click.IntRange(min=1), default=50_000),
        click.option("--per-proc-batch-size", type=click.IntRange(min=1), default=32),
        click.option("--mode", type=click.Choice(["ode", "sde"]), default="ode"),
        click.option("--num-steps", type=click.IntRange(min=1), default=50),
        click.option("--heun/--no-heun", default=False, help="Heun correction (ODE only)"),
        click.option("--cfg-scale", type=click.FloatRange(min=1.0), default=DEFAULT_CFG_SCALE,
                     help="classifier-free guidance scale; 1 = unguided"),
        click.option("--guidance-low", "--guidance_low", "guidance_low", type=float, default=0.0,
                     help="CFG applies for guidance-low <= t <= guidance-high"),
        click.option("--guidance-high", "--guidance_high", "guidance_high", type=float, default=1.0),
        click.option("--path-type", type=click.Choice(["linear", "cosine"]), default=None,
                     help="interpolant for the SDE score; default: the checkpoint's, else linear"),
        click.option("--global-seed", type=int, default=0),
        click.option("--label-sampling", type=click.Choice(["uniform", "balanced"]), default="uniform",
                     help="uniform: i.i.d. labels (reference protocol); balanced: sample i gets class i mod K"),
        click.option("--class-ids", default=None, help="comma-separated class indices to sample from, e.g. 1,2,3"),
        click.option("--null-class", type=int, default=None,
                     help="CFG null label (default: the model's num_classes; the reference hard-codes 1000)"),
        click.option("--sample-dir", default="samples", help="where the sample folder, .npz, .json and grid go"),
        click.option("--fused-attn/--no-fused-attn", default=False,
                     help="SDPA attention (the reference generate.py uses the explicit softmax: off)"),
        click.option("--tf32/--no-tf32", default=True, help="TF32 matmuls on CUDA"),
        click.option("--legacy/--no-legacy", default=False, help="rename decoder_blocks.* of old checkpoints"),
        click.option("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu"),
        click.option("--cache-dir", default=None, help="where --ckpt official is cached (default $REPA_CACHE or "
                     "~/.cache/repa)"),
        click.option("--no-progress", is_flag=True, default=False, help="no progress bars"),
        click.option("--prompts", default=None, help="text-to-image (MMDiT checkpoints): a file with one prompt per "
                     "line (docs/t2i.md)"),
        click.option("--prompts-from", default=None, help="text-to-image: prompts drawn (--global-seed) from the "
                     "captions.json of a captioned shard set; --num-fid-samples of them (default: every record)"),
        click.option("--text-encoder", default=None, help="text-to-image: override the checkpoint's text encoder"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


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


def _check_vae_flag(vae: str | None) -> None:
    """Refuse a --vae that names a missing or unusable local folder, before anything is loaded."""
    if vae is None or vae.strip().lower() in ("ema", "mse", "none"):
        return
    if os.path.isdir(vae):
        if not any(os.path.isfile(os.path.join(vae, *sub, "config.json")) for sub in ((), ("vae",))):
            raise SystemExit(f"repa-sample: --vae {vae}: a folder without config.json (nor vae/config.json); give "
                             "a diffusers AutoencoderKL folder (save_pretrained output), an HF id, ema, mse or none")
    elif vae.startswith(("/", ".", "~")) or os.path.exists(vae):
        raise SystemExit(f"repa-sample: --vae {vae}: no such directory; give a diffusers AutoencoderKL folder, an "
                         "HF repo id (owner/name), or one of ema, mse, none")


def _training_vae(vae_id: str | None, config: dict) -> str:
    """The VAE a repa-train checkpoint was trained with; a local folder that has moved is named, not guessed."""
    if vae_id is None:
        return "none"
    if os.path.isabs(vae_id) and not os.path.isdir(vae_id):
        cfg = os.path.join(config["source"]["path"], "config.json")
        raise SystemExit(f"repa-sample: the checkpoint was trained with the local VAE folder {vae_id} (recorded in "
                         f"{cfg}), which no longer exists; pass --vae with the folder's new location (or the HF id "
                         f"of the same VAE)")
    return vae_id


def _decoder_settings(args, config: dict) -> tuple[str, list, list, int]:
    """(vae spec, scale, bias, resolution) from the checkpoint config and the flags."""
    kw = config["model"]["kwargs"]
    data = config.get("data") or None
    if data:  # repa-train checkpoint: the latent space it was trained in
        vae_info = data.get("vae") or {}
        vae = args.vae or _training_vae(vae_info.get("id"), config)
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


def _checkpoint_tag(src: dict) -> str:
    """Names the weights: experiment and step (repa-train) or file name, plus a prefix of their hash, so a
    retrained checkpoint at the same path, or another experiment at the same step, gets its own folder."""
    if src["kind"] == "official":
        ck = "SiT-XL-2-256x256"
    elif src["kind"] == "repa-checkpoint":
        exp = str(src.get("experiment") or "exp").replace(os.sep, "-")
        ck = f"{exp}-{os.path.basename(src['path'].rstrip(os.sep))}"
    else:
        ck = os.path.basename(src["path"]).removesuffix(".pt").removesuffix(".safetensors")
    return f"{ck}-w{src['weights_sha256'][:8]}"


def _folder_name(config: dict, res: int, vae: str, spec: SamplingSpec) -> str:
    """The reference's folder name, plus the weights' identity and the settings it omits (steps, interval, ...)."""
    model = (config["model"]["name"] or "SiT").replace("/", "-")
    vae_tag = os.path.basename(str(vae).rstrip("/")).replace("/", "-")
    name = (f"{model}-{_checkpoint_tag(config['source'])}-size-{res}-vae-{vae_tag}-cfg-{spec.cfg_scale}"
            f"-seed-{spec.global_seed}-{spec.mode}-{spec.num_steps}steps")
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


def _check_flags(args) -> None:
    """Flag problems that need no checkpoint: refused before anything is loaded."""
    if args.guidance_low > args.guidance_high:
        raise SystemExit(f"repa-sample: --guidance-low {args.guidance_low} is above --guidance-high "
                         f"{args.guidance_high}: guidance would never apply; give low <= high")
    _parse_class_ids(args.class_ids)
    _check_vae_flag(args.vae)
    if args.vae is None and os.path.isdir(args.ckpt):  # a moved training VAE: say so before loading weights
        config = _peek_config(args.ckpt)
        if config is not None:
            _training_vae(((config.get("data") or {}).get("vae") or {}).get("id"), config)


def _peek_config(ckpt: str) -> dict | None:
    """The config.json of a repa-train checkpoint folder (None if unreadable: the loader reports that)."""
    import json

    try:
        path = _latest_checkpoint_dir(ckpt)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        return dict(config, source={"path": os.path.abspath(path)}) if isinstance(config, dict) else None
    except (CheckpointError, OSError, ValueError):
        return None


def _check_against_model(args, config: dict, model, cfg_is_default: bool) -> None:
    """Flags that the loaded checkpoint contradicts: refused before sampling."""
    kw, src = config["model"]["kwargs"], config["source"]
    if args.model and src["kind"] == "repa-checkpoint" and args.model != config["model"]["name"]:
        raise SystemExit(f"repa-sample: --model {args.model} but {src['path']} holds {config['model']['name']}; "
                         f"drop --model")
    if args.num_classes is not None and args.num_classes != kw["num_classes"]:
        raise SystemExit(f"repa-sample: --num-classes {args.num_classes} but the checkpoint has "
                         f"{kw['num_classes']} classes; drop the flag")
    if args.projector_embed_dims is not None:
        try:
            dims = [int(t) for t in args.projector_embed_dims.split(",") if t.strip()]
        except ValueError:
            dims = None
        if dims != list(kw.get("z_dims") or []):
            raise SystemExit(f"repa-sample: --projector-embed-dims {args.projector_embed_dims} but the checkpoint's "
                             f"projectors output {list(kw.get('z_dims') or [])}; drop the flag (the weights decide)")
    if args.qk_norm is not None and bool(args.qk_norm) != bool(kw.get("qk_norm")):
        raise SystemExit(f"repa-sample: --{'' if args.qk_norm else 'no-'}qk-norm but the checkpoint's weights "
                         f"{'lack' if args.qk_norm else 'have'} QK-norm; drop the flag (the weights decide)")
    rows = model.y_embedder.embedding_table.num_embeddings
    null = kw["num_classes"] if args.null_class is None else args.null_class
    if args.cfg_scale > 1.0 and null >= rows:
        raise SystemExit(
            f"repa-sample: --cfg-scale {args.cfg_scale}{' (the default)' if cfg_is_default else ''} asks for "
            f"classifier-free guidance, but {src['path']} has no null-class label (row {null} of a {rows}-row "
            f"table): it was trained without label dropout (repa-train --cfg-prob 0), so there is no unconditional "
            f"model to guide with. Pass --cfg-scale 1 to sample unguided")


def _spec(args, kw: dict) -> SamplingSpec:
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
    return spec


def _load(args, info: DistInfo):
    try:
        model, config = load_sampling_model(
            args.ckpt, model_name=args.model, encoder_depth=args.encoder_depth, fused_attn=args.fused_attn,
            device=info.device, cache_dir=args.cache_dir, legacy=True if args.legacy else None,
            weights=args.weights, num_heads=args.num_heads)
    except CheckpointError as e:
        raise SystemExit(f"repa-sample: --ckpt: {e}") from None
    return model, config


def _decoder(vae_spec: str, scale, bias, device) -> LatentDecoder:
    try:
        vae = load_vae(vae_spec, device)
    except (OSError, ValueError) as e:  # FileNotFoundError, a failed/blocked download, a malformed id
        raise SystemExit(f"repa-sample: --vae {vae_spec}: {e}") from None
    return LatentDecoder(vae, scale, bias, device)


def run(args, info: DistInfo, cfg_is_default: bool = False, stop: StopSignals | None = None) -> str | None:
    """Sample (see the module docstring). Returns the .npz path on rank 0, None elsewhere or when stopped."""
    if getattr(args, "prompts", None) or getattr(args, "prompts_from", None):  # text-to-image: sampler/t2i.py
        return run_from_args(args, info)
    _check_flags(args)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model, config = _load(args, info)
    kw = config["model"]["kwargs"]
    # The REPA projector heads only feed the training loss; the velocity never depends on them. Dropping them
    # saves their matmuls at every step (2-6% of a SiT forward) without changing a single output value.
    if hasattr(model, "projectors"):
        model.projectors = torch.nn.ModuleList()
    _check_against_model(args, config, model, cfg_is_default)
    vae_spec, scale, bias, res = _decoder_settings(args, config)
    spec = _spec(args, kw)
    decoder = _decoder(vae_spec, scale, bias, info.device)
    folder = os.path.join(args.sample_dir, _folder_name(config, res, vae_spec, spec))
    src = config["source"]
    identity = spec_identity(spec, {
        "checkpoint": {k: src.get(k) for k in ("kind", "experiment", "step", "weights", "weights_sha256")},
        "model": config["model"]["name"], "vae": vae_spec, "scale": scale, "bias": bias, "resolution": res,
        "fused_attn": bool(args.fused_attn)})
    lock = prepare_folder(folder, identity, info)
    try:
        return _generate_and_finalize(args, info, model, decoder, spec, folder, config, (vae_spec, scale, bias, res),
                                      stop)
    finally:
        if lock is not None:
            lock.release()


def _generate_and_finalize(args, info, model, decoder, spec, folder, config, vae, stop) -> str | None:
    labels = make_labels(spec.num_samples, spec.global_seed, spec.num_classes, spec.class_ids, spec.label_sampling)
    t0 = time.perf_counter()
    done = generate_pngs(model, decoder, spec, folder, labels, info, args.per_proc_batch_size,
                         not args.no_progress, stop)
    elapsed = time.perf_counter() - t0
    stopped = any_rank(stop is not None and stop.received is not None, info)  # every rank agrees: no hang
    barrier(info)
    if info.rank != 0:
        return None
    if stopped:
        have = sum(os.path.isfile(png_path(folder, i)) for i in range(spec.num_samples))
        print(f"repa-sample: stopped by {stop.received or 'a signal on another rank'}: {have} of "
              f"{spec.num_samples} PNGs are in {folder} ({done} written by this process in this run); rerun the "
              f"same command to resume", file=sys.stderr, flush=True)
        return None
    vae_spec, scale, bias, res = vae
    record = {"command": " ".join(sys.argv), "args": vars(args), "checkpoint": config["source"],
              "model": config["model"], "vae": {"spec": vae_spec, "scale": scale, "bias": bias},
              "resolution": res, "world_size": info.world, "generated_by_rank0_this_run": done,
              "sampling_seconds": elapsed}
    return finalize_outputs(folder, spec, labels, record, not args.no_progress)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                 "max_content_width": 110},
               help=__doc__.split("\n\n")[0].replace("``", ""))
@_options
@click.version_option(package_name="repa", prog_name="repa-sample")
@click.pass_context
def cli(ctx, **kwargs):
    args = SimpleNamespace(**kwargs)
    cfg_is_default = ctx.get_parameter_source("cfg_scale") == ParameterSource.DEFAULT
    info = init_distributed(args.device)
    stop = StopSignals().install()
    try:
        npz = run(args, info, cfg_is_default, stop)
    finally:
        stop.restore()
        if info.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if npz is not None:
        print(npz, flush=True)
    return npz


def main(argv=None) -> str | None:
    """Python entry point: ``main([...flags...])`` -> the .npz path (None when stopped by a signal).

    Bad flags raise SystemExit with the message; a refused sample folder (not ours, other settings, or held by
    another run) raises FolderRefused, a ValueError.
    """
    try:
        return cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="repa-sample",
                        standalone_mode=False, obj={"python_api": True})
    except click.ClickException as e:
        raise SystemExit(f"repa-sample: {e.format_message()}") from None


if __name__ == "__main__":
    cli(prog_name="repa-sample")
