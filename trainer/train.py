"""repa-train: SiT + REPA (and HASTE) on cached shards, one CPU to many GPUs/nodes via HF accelerate.

The whole loop is ``train(cfg)`` below, readable top to bottom like nanoGPT's train.py:

    shards manifest -> dimension checks -> model, EMA, AdamW -> accelerate.prepare -> resume
    -> loop: [micro-batches: posterior sample, REPA (+HASTE) loss, backward] -> clip -> step -> EMA
             -> log (tqdm, metrics.jsonl, trackers) -> checkpoint / preview / stop on SIGTERM

Reference behaviour reproduced (docs/reference.md §3): AdamW(1e-4, (0.9, 0.999), wd 0, eps 1e-8), constant LR,
clip 1.0, EMA 0.9999 over all named parameters in fp32 every sync step, a fresh posterior sample every
step, label dropout only inside the model (``--cfg-prob`` is the model's ``class_dropout_prob``),
RNG draw order posterior -> t (CPU) -> noise -> label drop, per-rank seed ``seed + rank``.
Reference bugs avoided: gradient accumulation works, single-process checkpoints work, the GradScaler,
data position and every rank's RNG are checkpointed, previews use the EMA in eval mode.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from repa.trainer import checkpoint as ckpt
from repa.trainer.ema import make_ema, update_ema
from repa.trainer.haste import HasteConfig, attention_alignment_loss, default_haste_config
from repa.trainer.loss import REPALoss
from repa.trainer.metrics import JsonlWriter, PreviewDecoder, check_report_to, euler_preview, save_png, to_grid
from repa.trainer.models import SiT, model_config


@dataclass
class TrainConfig:
    """Every training flag (CLI ``--foo-bar`` is field ``foo_bar``). Defaults are the paper recipe."""
    shards: str = ""
    exp_name: str = "repa"
    output_dir: str = "exps"
    storage_options: dict = field(default_factory=dict)
    # model
    model: str = "SiT-XL/2"
    model_kwargs: dict = field(default_factory=dict)  # overrides of SiT(...) kwargs (tests, demos)
    encoder_depth: int = 8
    fused_attn: bool = True
    qk_norm: bool = False
    # loss
    proj_coeff: float = 0.5
    path_type: str = "linear"
    prediction: str = "v"
    weighting: str = "uniform"
    cfg_prob: float = 0.1
    # optimisation
    batch_size: int = 256  # GLOBAL batch (all processes x accumulation steps)
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400_000
    ema_decay: float = 0.9999
    mixed_precision: str = "fp16"
    allow_tf32: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    # data
    num_workers: int = 4
    shuffle_window: int = 512
    # checkpoints / logging
    checkpointing_steps: int = 50_000
    keep_last: int = 0  # 0 = keep all
    resume: str | None = None  # "auto" or a checkpoint directory
    report_to: str = "none"
    sampling_steps: int = 10_000
    num_preview: int = 16
    preview_steps: int = 50
    preview_cfg: float = 4.0
    # HASTE (issue 6)
    haste: bool | None = None  # None = on iff the manifest has provenance["haste"]
    attn_coeff: float = 0.5
    early_stop_point: int = 250_000

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm stops being finite; names the step and last checkpoint."""


# ---------------------------------------------------------------- data and dimension checks

def resolve_shards(url: str, storage_options: dict | None = None) -> str:
    """The shard-set directory holding manifest.json: ``url`` itself or its single child that has one."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(f"{root.rstrip('/')}/manifest.json"):
        return url
    if not fs.isdir(root):
        raise FileNotFoundError(f"--shards {url}: no such directory; pass the output of repa-preprocess")
    children = sorted(p for p in fs.ls(root, detail=False)
                      if fs.isdir(p) and fs.exists(f"{p.rstrip('/')}/manifest.json"))
    if len(children) == 1:
        child = children[0].rstrip("/").rsplit("/", 1)[-1]
        return f"{url.rstrip('/')}/{child}"
    if not children:
        raise FileNotFoundError(f"--shards {url}: no manifest.json there or in a subdirectory; "
                                f"pass a shard set written by repa-preprocess")
    names = [c.rstrip("/").rsplit("/", 1)[-1] for c in children]
    raise ValueError(f"--shards {url} holds several shard sets {names}; pass one of them, "
                     f"e.g. --shards {url.rstrip('/')}/{names[0]}")


def teacher_fields(manifest) -> list[str]:
    """``feat.<i>`` field names in teacher order."""
    return sorted((f for f in manifest.fields if f.startswith("feat.")), key=lambda f: int(f.split(".")[1]))


def plan_model(cfg: TrainConfig, manifest, shards_url: str) -> dict:
    """Full SiT kwargs from the flags and the manifest; raises ValueError before step 1 on any mismatch."""
    where = f"--shards {shards_url} (manifest.json)"
    if "moments" not in manifest.fields:
        raise ValueError(f"{where} has no 'moments' field; re-run repa-preprocess")
    two_c, h, w = manifest.fields["moments"].shape
    if h != w or two_c % 2:
        raise ValueError(f"{where}: moments shape {(two_c, h, w)} is not (2C, H, H)")
    prov = manifest.provenance
    vae = prov.get("vae") or {}
    c = two_c // 2
    if int(vae.get("latent_channels", c)) != c or len(vae.get("scale", [1.0] * c)) != c:
        raise ValueError(f"{where}: vae.latent_channels/scale {vae} disagree with moments channels {c}")
    feats = teacher_fields(manifest)
    if cfg.proj_coeff and not feats:
        raise ValueError(f"{where} has no teacher features (feat.<i>); re-run repa-preprocess with a "
                         f"teacher or train without alignment: --proj-coeff 0")
    overrides = dict(input_size=h, in_channels=c, num_classes=int(prov.get("num_classes", 1000)),
                     z_dims=[manifest.fields[f].shape[-1] for f in feats], encoder_depth=cfg.encoder_depth,
                     class_dropout_prob=cfg.cfg_prob, fused_attn=cfg.fused_attn, qk_norm=cfg.qk_norm)
    kwargs = model_config(cfg.model, **{**overrides, **cfg.model_kwargs})
    for key in ("input_size", "in_channels", "z_dims", "num_classes"):
        if kwargs[key] != overrides[key]:
            raise ValueError(f"--model-kwargs sets {key}={kwargs[key]} but {where} implies {overrides[key]}")
    if h % kwargs["patch_size"]:
        raise ValueError(f"--model {cfg.model}: patch size {kwargs['patch_size']} does not divide the latent "
                         f"size {h} of {where}; pick a model whose patch size divides {h}")
    if not 1 <= kwargs["encoder_depth"] <= kwargs["depth"]:
        raise ValueError(f"--encoder-depth {kwargs['encoder_depth']} must be in [1, {kwargs['depth']}] "
                         f"for --model {cfg.model}")
    for f in feats:
        tokens = manifest.fields[f].shape[0]
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"{where}: teacher field {f} has {tokens} tokens, not a square grid")
    return kwargs


def sample_latents(moments: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fresh posterior sample z = (mean + std * eps) * scale + bias; moments = [mean | std] on channels."""
    mean, std = moments.float().chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * scale + bias


# ---------------------------------------------------------------- one loss evaluation

@dataclass
class HasteOnline:
    """HASTE phase I: the teacher's remaining blocks, run online on the cached residual ``field``."""
    config: HasteConfig
    teacher: torch.nn.Module | None  # loaded by load_teacher() only while phase I is still ahead
    field: str  # e.g. "haste.0": residual entering teacher block ``start_block``
    teacher_index: int  # which feat.<i> the online features replace
    start_block: int
    autocast: object = nullcontext  # the teacher runs under the run's mixed precision, like the reference's
    load_teacher: object = None

    def __call__(self, residual):
        with torch.no_grad(), self.autocast():
            return self.teacher.forward_from(residual, self.start_block, self.config.teacher_blocks)


def compute_loss(model, loss_fn: REPALoss, batch: dict, *, scale, bias, feats: list[str], proj_coeff: float,
                 haste: HasteOnline | None = None, draws: dict | None = None):
    """Total loss and its logged parts [denoise, proj, attn] for one micro-batch (already on the device).

    RNG order (docs/reference.md §3.3): posterior eps, t (CPU), noise, label drop inside the model. ``draws``
    (tests only) fixes them: {"posterior": eps, "t": t, "noise": noise, "drop": force_drop_ids}.
    ``feats`` empty = no alignment (HASTE phase II). ``haste`` set = HASTE phase I: the online teacher
    gives the attention logits and the aligned features of teacher ``haste.teacher_index``.
    """
    draws = draws or {}
    if "posterior" in draws:
        mean, std = batch["moments"].float().chunk(2, dim=1)
        x0 = (mean + std * draws["posterior"]) * scale + bias
    else:
        x0 = sample_latents(batch["moments"], scale, bias)
    zs = [batch[f].float() if f in batch else None for f in feats] or None
    if haste is not None:
        online_feats, teacher_attn = haste(batch[haste.field])
        zs[haste.teacher_index] = online_feats.float()
    out = loss_fn(model, x0, batch["label"], zs, t=draws.get("t"), noise=draws.get("noise"),
                  force_drop_ids=draws.get("drop"), return_attn=haste is not None)
    denoise, proj = out[0].mean(), out[1]
    loss = denoise + proj_coeff * proj
    attn = torch.zeros((), device=denoise.device)
    if haste is not None:
        attn = attention_alignment_loss(out[2], teacher_attn, haste.config.student_blocks, None,
                                        haste.config.heads)
        loss = loss + haste.config.attn_coeff * attn
    return loss, torch.stack([denoise.detach(), proj.detach(), attn.detach()])


# ---------------------------------------------------------------- the loop

class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits 0."""

    def __init__(self):
        self.set = False
        self.previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no pre-emption handling
                pass

    def _handler(self, signum, frame):
        self.set = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def build_loader(cfg: TrainConfig, shards_url: str, fields, rank: int, world: int, micro_batch: int):
    """Each rank streams its own slice of the shard set, forever."""
    from repa.shards import ShardStream, make_loader
    stream = ShardStream(shards_url, micro_batch, fields=fields, shuffle=True, seed=cfg.seed, infinite=True,
                         shuffle_window=cfg.shuffle_window, rank=rank, world_size=world, drop_last=True,
                         storage_options=cfg.storage_options or None)
    return make_loader(stream, num_workers=cfg.num_workers)


class RngNeutral:
    """Iterates ``loader`` without ever touching the global CPU RNG (DataLoader draws its base seed from it
    when the iteration starts), so building, rebuilding or resuming a reader never shifts the training draws."""

    def __init__(self, loader):
        with torch.random.fork_rng(devices=[]):
            self.it = iter(loader)

    def __next__(self):
        with torch.random.fork_rng(devices=[]):
            return next(self.it)


def make_accelerator(cfg: TrainConfig, log_with: str | None, find_unused: bool, project_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns {"step", "checkpoint", "exp_dir"}."""
    from repa.shards import read_manifest
    from accelerate.utils import set_seed

    # ---- shards, dimensions, flags: everything that can be wrong fails here, before step 1
    shards_url = resolve_shards(cfg.shards, cfg.storage_options)
    manifest = read_manifest(shards_url, storage_options=cfg.storage_options or None)
    model_kwargs = plan_model(cfg, manifest, shards_url)
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision must be no|fp16|bf16, got {cfg.mixed_precision!r}")
    log_with = check_report_to(cfg.report_to)
    prov = manifest.provenance
    feats = teacher_fields(manifest)
    haste_prov = prov.get("haste")
    haste_on = bool(haste_prov) if cfg.haste is None else cfg.haste
    if haste_on and not haste_prov:
        raise ValueError(f"--haste needs shards written with repa-preprocess --haste; {shards_url} has "
                         f"provenance.haste = null")
    exp_dir = os.path.join(cfg.output_dir, cfg.exp_name)
    ckpt_root = ckpt.checkpoint_root(cfg.output_dir, cfg.exp_name)

    accelerator = make_accelerator(cfg, log_with, find_unused=haste_on, project_dir=exp_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accum = cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * accum):
        raise ValueError(f"--batch-size {cfg.batch_size} (global) must be divisible by processes ({world}) x "
                         f"--gradient-accumulation-steps ({accum})")
    micro_batch = cfg.batch_size // (world * accum)
    log = _make_logger(exp_dir if accelerator.is_main_process else None)
    log.info(f"processes={world} device={device} mixed_precision={cfg.mixed_precision} "
             f"global_batch={cfg.batch_size} micro_batch={micro_batch} grad_accum={accum}")
    log.info(f"shards {shards_url}: {manifest.num_records} records, latent {tuple(manifest.fields['moments'].shape)}, "
             f"teachers {feats}, vae {(prov.get('vae') or {}).get('id')}")
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- model, EMA, optimizer (same init on every rank, then per-rank RNG seed + rank)
    torch.manual_seed(cfg.seed)
    model = SiT(**model_kwargs)
    model.grad_checkpointing = cfg.grad_checkpointing
    ema = make_ema(model)
    haste = _setup_haste(cfg, prov, model_kwargs, accelerator) if haste_on else None
    if cfg.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    log.info(f"SiT {cfg.model} {json.dumps(model_kwargs)}: {sum(p.numel() for p in model.parameters()):,} parameters")

    # ---- resume: weights before prepare, optimizer/scaler after
    global_step, state = 0, None
    resume_path = _resume_path(cfg.resume, ckpt_root)
    if resume_path:
        loaded = ckpt.load_checkpoint(resume_path)
        if loaded["config"]["model"]["kwargs"] != json.loads(json.dumps(model_kwargs)):
            raise ValueError(f"--resume {resume_path}: its model config {loaded['config']['model']['kwargs']} "
                             f"differs from this run's {model_kwargs}; use the same --model/--model-kwargs")
        model.load_state_dict(loaded["model"])
        ema.load_state_dict(loaded["ema"])
        state = loaded["train_state"]
        global_step = int(state["step"])
        log.info(f"resumed from {resume_path} at step {global_step}")
    elif cfg.resume == "auto":
        log.info(f"--resume auto: no checkpoint under {ckpt_root}, starting from step 0")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ema.to(device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
    if haste is not None and haste.config.active(global_step):  # fail fast, before step 1
        haste.teacher = haste.load_teacher()

    # ---- data: HASTE phase II reads no teacher data at all
    def phase_fields(step):
        if haste is None:
            return ["moments", *feats]
        if not haste.config.active(step):
            return ["moments"]
        return ["moments", *[f for f in feats if f != f"feat.{haste.teacher_index}"], haste.field]

    fields = phase_fields(global_step)
    loader = build_loader(cfg, shards_url, fields, rank, world, micro_batch)
    set_seed(cfg.seed + rank)
    if state is not None:
        if int(state.get("world_size", world)) == world:
            loader.load_state_dict(state["ranks"][rank]["loader"])
        else:
            log.warning(f"--resume: checkpoint was written by {state.get('world_size')} processes, this run has "
                        f"{world}; the data order and RNG restart (not bitwise-resumable)")
            set_seed(cfg.seed + rank + 1_000_003 * global_step)
    data = RngNeutral(loader)
    if state is not None and int(state.get("world_size", world)) == world:
        ckpt.set_rng_state(state["ranks"][rank]["rng"])

    scale = torch.tensor((prov.get("vae") or {}).get("scale", [1.0] * model_kwargs["in_channels"]),
                         device=device).view(1, -1, 1, 1)
    bias = torch.tensor((prov.get("vae") or {}).get("bias", [0.0] * model_kwargs["in_channels"]),
                        device=device).view(1, -1, 1, 1)
    loss_fn = REPALoss(prediction=cfg.prediction, path_type=cfg.path_type, weighting=cfg.weighting)
    run_config = {"model": {"name": cfg.model, "kwargs": model_kwargs}, "data": prov, "args": cfg.to_json(),
                  "repa_version": _version()}
    preview = _Preview(cfg, model_kwargs, prov, device) if accelerator.is_main_process and cfg.sampling_steps else None
    metrics = JsonlWriter(os.path.join(exp_dir, "metrics.jsonl")) if accelerator.is_main_process else None
    if log_with:
        accelerator.init_trackers("REPA" if haste is None else "HASTE", config=_flat(cfg.to_json()))

    def save(step):
        return _save(accelerator, ckpt_root, step, raw_model, ema, optimizer, loader, run_config, cfg.keep_last)

    stop = _StopFlag()
    stop.install()
    last_ckpt = resume_path
    saved_at = global_step if resume_path else None
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.max_train_steps, initial=global_step, disable=not accelerator.is_main_process,
               dynamic_ncols=True, desc="train")
    model.train()
    t_last = time.perf_counter()
    try:
        while global_step < cfg.max_train_steps:
            # HASTE stage-wise termination: from early_stop_point on, denoising only and no teacher I/O
            if fields != phase_fields(global_step):
                fields = phase_fields(global_step)
                position = loader.state_dict()
                loader = build_loader(cfg, shards_url, fields, rank, world, micro_batch)
                loader.load_state_dict(position)
                data = RngNeutral(loader)
                haste.teacher = None  # free the teacher: phase II never runs it again
                log.info(f"step {global_step}: HASTE early stop, alignment off; reading only {fields}")
            phase1 = haste if (haste is not None and haste.config.active(global_step)) else None
            align = haste is None or phase1 is not None
            stats = torch.zeros(3, device=device)
            step_batches = []  # kept only to name the cause if the loss is not finite
            for micro in range(accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
                step_batches.append(batch)
                sync = micro == accum - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss, parts = compute_loss(
                        model, loss_fn, batch, scale=scale, bias=bias, feats=feats if align else [],
                        proj_coeff=cfg.proj_coeff if align else 0.0, haste=phase1)
                    accelerator.backward(loss / accum)
                stats += parts / accum
            # one collective per step: the logged losses (mean over ranks) and the stop flag
            reduced = accelerator.reduce(torch.cat([stats, torch.tensor([float(stop.set)], device=device)]),
                                         reduction="sum").tolist()
            denoise, proj, attn = (v / world for v in reduced[:3])
            if not all(math.isfinite(v) for v in (denoise, proj, attn)):
                raise NonFiniteLossError(_nonfinite_msg(global_step + 1, denoise, proj, last_ckpt,
                                                        cause=_nonfinite_cause(step_batches, shards_url)))
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":  # fp16: the scaler skips the step
                raise NonFiniteLossError(_nonfinite_msg(global_step + 1, denoise, proj, last_ckpt, grad_norm,
                                                        cause=_nonfinite_cause(step_batches, shards_url)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, cfg.ema_decay)
            global_step += 1

            # ---- logging
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            record = {"step": global_step, "loss": denoise, "proj_loss": proj, "grad_norm": grad_norm,
                      "lr": optimizer.param_groups[0]["lr"], "steps_per_s": 1 / dt, "samples_per_s": cfg.batch_size / dt}
            if haste is not None:
                record["attn_loss"] = attn
            if metrics is not None:
                metrics.write({**record, "time": time.time()})
            if log_with:
                accelerator.log(record, step=global_step)
            bar.set_postfix(loss=f"{denoise:.4f}", proj=f"{proj:.4f}", gnorm=f"{grad_norm:.3f}",
                            samples_s=f"{cfg.batch_size / dt:.1f}", refresh=False)
            bar.update(1)

            # ---- checkpoint, preview, pre-emption
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps or reduced[3] > 0:
                last_ckpt, saved_at = save(global_step), global_step
                log.info(f"step {global_step}: saved checkpoint {last_ckpt}")
            if preview is not None and global_step % cfg.sampling_steps == 0:
                preview(ema, os.path.join(exp_dir, "samples", f"{global_step:07d}.png"))
            if reduced[3] > 0:
                log.info(f"step {global_step}: stop signal received, exiting after checkpoint {last_ckpt}")
                break
        if saved_at != global_step:  # e.g. resumed at/after max_train_steps
            last_ckpt = save(global_step)
    finally:
        stop.restore()
        bar.close()
        if metrics is not None:
            metrics.close()
        if log_with:
            accelerator.end_training()
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
    return {"step": global_step, "checkpoint": last_ckpt, "exp_dir": exp_dir}


# ---------------------------------------------------------------- helpers

def _save(accelerator, root, step, raw_model, ema, optimizer, loader, run_config, keep_last) -> str:
    """Gather every rank's RNG + reader position to rank 0, which writes the checkpoint atomically."""
    from accelerate.utils import gather_object
    per_rank = gather_object([{"rng": ckpt.rng_state(), "loader": loader.state_dict()}])
    path = os.path.join(root, f"{step:07d}")
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler,
                       "world_size": accelerator.num_processes, "ranks": per_rank}
        path = ckpt.save_checkpoint(root, step, model_sd=raw_model.state_dict(), ema_sd=ema.state_dict(),
                                    train_state=train_state, config={**run_config, "step": step},
                                    keep_last=keep_last or None)
    accelerator.wait_for_everyone()
    return path


def _resume_path(resume: str | None, root: str) -> str | None:
    if not resume:
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(root)  # None: fresh start
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory; pass "
                                f"<output-dir>/<exp-name>/checkpoints/<step> or --resume auto")
    return resume


def _setup_haste(cfg: TrainConfig, prov: dict, model_kwargs: dict, accelerator) -> HasteOnline:
    """Teacher for the online part of HASTE phase I and the layer/head mapping (trainer/haste.py)."""
    from repa.preprocess.teachers import load_teacher
    info = prov["haste"]
    ti = int(info.get("teacher", 0))
    meta = prov["teachers"][ti]
    t_depth, t_heads = int(meta.get("depth", 12)), int(meta.get("heads", 12))
    attn_blocks = tuple(int(b) for b in info.get("attn_blocks", range(t_depth - 4, t_depth)))
    config = default_haste_config(model_kwargs["encoder_depth"], model_kwargs["num_heads"], t_depth, t_heads,
                                  num_pairs=len(attn_blocks), teacher_blocks=attn_blocks,
                                  attn_coeff=cfg.attn_coeff, early_stop_point=cfg.early_stop_point)
    config.validate(model_kwargs["depth"], model_kwargs["num_heads"], model_kwargs["encoder_depth"],
                    t_depth, t_heads)
    start = int(info.get("start_block", min(attn_blocks)))
    if start > min(attn_blocks):
        raise ValueError(f"HASTE shards cache the residual entering teacher block {start}, after the first "
                         f"aligned block {min(attn_blocks)}; re-run repa-preprocess --haste")

    def load():
        teacher = load_teacher(meta["name"], int(prov.get("resolution", 256)), accelerator.device,
                               grid=tuple(meta["grid"]) if meta.get("grid") else None)
        return teacher.eval().requires_grad_(False)
    return HasteOnline(config, None, info.get("field", f"haste.{ti}"), ti, start, accelerator.autocast, load)


class _Preview:
    """EMA sample grid with fixed noise/labels (own generator: never touches the training RNG)."""

    def __init__(self, cfg, model_kwargs, prov, device):
        g = torch.Generator().manual_seed(cfg.seed)
        c, s = model_kwargs["in_channels"], model_kwargs["input_size"]
        self.noise = torch.randn(cfg.num_preview, c, s, s, generator=g).to(device)
        self.labels = torch.randint(model_kwargs["num_classes"], (cfg.num_preview,), generator=g).to(device)
        self.decode = PreviewDecoder(prov, device)
        # a model trained without label dropout (--cfg-prob 0) has no null class to guide with
        self.steps = cfg.preview_steps
        self.cfg_scale = cfg.preview_cfg if model_kwargs.get("class_dropout_prob", 0.1) > 0 else 1.0

    def __call__(self, ema, path):
        z = euler_preview(ema, self.noise, self.labels, self.steps, self.cfg_scale)
        save_png(to_grid(self.decode(z)), path)


def _nonfinite_cause(batches: list[dict], shards_url: str) -> str:
    """Why the loss is not finite: non-finite values in this step's input records, or divergence."""
    bad = []
    for batch in batches:
        keys = batch.get("key")
        for name, t in batch.items():
            if name == "key" or not torch.is_floating_point(t):
                continue
            rows = (~torch.isfinite(t.reshape(len(t), -1))).any(dim=1)
            if rows.any():
                ks = keys[rows].tolist() if keys is not None else []
                bad.append(f"field '{name}' of record key(s) {ks[:10]}")
    if bad:
        return (f"cause: non-finite values in the input records ({'; '.join(bad)}) of {shards_url}; "
                f"re-create those shards (repa-preprocess) or remove the records")
    return ("cause: the inputs are finite, the optimisation diverged; resume with a lower --learning-rate "
            "(or a smaller --max-grad-norm)")


def _nonfinite_msg(step, denoise, proj, last_ckpt, grad_norm=None, cause: str = "") -> str:
    what = f"loss={denoise}, proj_loss={proj}" + (f", grad_norm={grad_norm}" if grad_norm is not None else "")
    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
    return (f"non-finite loss at step {step} ({what}); stopped without saving. {cause + '. ' if cause else ''}"
            f"{where}. Resume from it with a lower --learning-rate or check the shards for bad values.")


def _make_logger(exp_dir: str | None) -> logging.Logger:
    """Console + <exp_dir>/log.txt on the main process; other ranks only warn."""
    log = logging.getLogger(f"repa.train.{id(object())}")
    log.propagate = False
    log.setLevel(logging.INFO if exp_dir else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler()]
    if exp_dir:
        os.makedirs(exp_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(exp_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def _flat(d: dict) -> dict:
    """Tracker configs accept scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in d.items()}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("repa")
    except Exception:  # noqa: BLE001
        return "0.1.0"
