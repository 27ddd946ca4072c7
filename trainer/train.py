"""repa-train: SiT + REPA (and HASTE) on cached shards, one CPU to many GPUs/nodes via HF accelerate.

The whole run is ``train(cfg)`` below, readable top to bottom like nanoGPT's train.py:

    plan_run (flags, shards manifest, dimensions: refused before anything starts)
    -> claim_experiment (rank 0 under the experiment's lock: folders, checkpoint choice, flag changes)
    -> model, EMA, AdamW -> resume (weights, accelerate.prepare, optimizer, data position, RNG)
    -> loop: StepRunner [micro-batches: posterior sample, REPA (+HASTE) loss, backward -> one all-reduce
             -> clip -> AdamW -> EMA] -> RunLog (metrics.jsonl, trackers, tqdm, previews)
             -> checkpoint (checkpoint.Checkpointer) -> stop on SIGTERM/SIGINT/--requeue-signal (preempt.py)

What a rerun or resume may change, and what it continues from: trainer/resume.py. Refusals: trainer/guards.py.

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
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch

from repa.shards import ShardError, ShardStream, decode_batch, make_loader, read_manifest, reader
from repa.shards import records as R
from repa.shards.lock import LockHeld, OutputLock
from repa.trainer import checkpoint as ckpt
from repa.trainer import guards
from repa.trainer import mmdit as t2i  # text-to-image path (docs/t2i.md)
from repa.trainer import preempt, resume
from repa.trainer.ema import make_ema, update_ema
from repa.trainer.guards import ConfigError
from repa.trainer.haste import HasteOnline, setup_haste
from repa.trainer.loss import REPALoss
from repa.trainer.metrics import Preview, RunLog, check_report_to
from repa.trainer.models import SiT, model_config


def flag(default, help: str = "", **cli):
    """A TrainConfig field that is also a repa-train flag ``--<name with dashes>`` (trainer/cli.py builds the
    command line from these fields: each flag, its default and its help are written once, here). ``cli`` holds
    click settings: ``aliases``, ``choices``, ``json`` (a JSON object), ``required``, ``dest``."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Every training flag (CLI ``--foo-bar`` is field ``foo_bar``). Defaults are the paper recipe."""
    shards: str = flag("", "Shard set from repa-preprocess: directory or URL (s3://, ...); a directory holding "
                       "exactly one shard set is accepted too.", aliases=["--data-dir"], required=True)
    exp_name: str = flag("repa", "Run folder <output-dir>/<exp-name> (a plain name).", required=True)
    output_dir: str = flag("exps")
    storage_options: dict = flag({}, "fsspec options as JSON (object stores).", json=True)
    # model
    model: str = flag("SiT-XL/2", "SiT-{S,B,L,XL}/{1,2,4,8}; captioned (text.*) shards: MMDiT-{S,B,L,XL}/2 "
                      "(MMDiT-B/2 = the official t2i recipe, docs/t2i.md).")
    model_kwargs: dict = flag({}, "JSON overrides of SiT(...) kwargs, e.g. '{\"depth\": 2, \"hidden_size\": 64, "
                              "\"num_heads\": 2}'.", json=True)
    encoder_depth: int = flag(8, "1-indexed block whose output is projected.")
    fused_attn: bool = flag(True)
    qk_norm: bool = flag(False, pair=True)
    # loss
    proj_coeff: float = flag(0.5)
    path_type: str = flag("linear", choices=["linear", "cosine"])
    prediction: str = flag("v", choices=["v"])
    weighting: str = flag("uniform", choices=["uniform", "lognormal"])
    cfg_prob: float = flag(0.1, "Label dropout probability = the model's class_dropout_prob (applied once, inside "
                           "the model).")
    # optimisation
    batch_size: int = flag(256, "GLOBAL batch over all processes and accumulation steps.")
    learning_rate: float = flag(1e-4)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_weight_decay: float = flag(0.0)
    adam_epsilon: float = flag(1e-8)
    max_grad_norm: float = flag(1.0)
    gradient_accumulation_steps: int = flag(1)
    max_train_steps: int = flag(400_000)
    ema_decay: float = flag(0.9999)
    mixed_precision: str = flag("fp16", choices=["no", "fp16", "bf16"])
    allow_tf32: bool = flag(False)
    compile: bool = flag(False, "torch.compile the SiT.")
    grad_checkpointing: bool = flag(False, "Activation checkpointing of every SiT block (less memory, ~30% more "
                                    "compute).")
    seed: int = flag(0, "Rank r uses seed + r.")
    # data
    num_workers: int = flag(4, "DataLoader workers per process.")
    shuffle_window: int = flag(512)
    # checkpoints / logging
    checkpointing_steps: int = flag(50_000)
    keep_last: int = flag(0, "Keep only the newest K checkpoints (0: all; nothing else is ever deleted).")
    resume: str | None = flag("auto", "'auto': continue from the newest intact checkpoint of this experiment (a "
                              "fresh start if it has none), so rerunning the same command (a SLURM requeue) "
                              "continues; or a checkpoint directory.")
    skip_bad: bool = flag(False, "Skip corrupt records (counted in metrics.jsonl as skipped_records and in the "
                          "log) instead of stopping with a checkpoint.")
    requeue_signal: str = flag("USR1", "Signal that means 'checkpoint, then exit 0' (besides SIGTERM/SIGINT), "
                               "e.g. for sbatch --signal=USR1@120; 'none' to disable.")
    preview_vae: str | None = flag(None, "VAE folder for decoding previews when the shards' VAE folder (manifest "
                                   "vae.id) has moved.")
    progress: bool = flag(True, "tqdm progress bar.")
    report_to: str = flag("none", "Tracker; <output-dir>/<exp-name>/metrics.jsonl is written in any case.",
                          choices=["none", "tensorboard", "wandb"])
    sampling_steps: int = flag(10_000, "EMA preview grid every N steps (0: off).")
    num_preview: int = flag(16)
    preview_steps: int = flag(50, "Euler steps of the preview sampler.")
    preview_cfg: float = flag(4.0)
    # HASTE
    haste: bool | None = flag(None, "HASTE attention alignment (default: on iff the shards were written with "
                              "repa-preprocess --haste).", pair=True)
    attn_coeff: float = flag(0.5)
    early_stop_point: int = flag(250_000, "HASTE: first step without any alignment (no teacher data is read "
                                 "from then on).")

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
    return R.teacher_fields(manifest.fields)


def plan_model(cfg: TrainConfig, manifest, shards_url: str) -> dict:
    """Full SiT kwargs from the flags and the manifest; raises ValueError before step 1 on any mismatch."""
    where = f"--shards {shards_url} (manifest.json)"
    if R.MOMENTS not in manifest.fields:
        raise ValueError(f"{where} has no 'moments' field; re-run repa-preprocess")
    two_c, h, w = manifest.fields[R.MOMENTS].shape
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


# ---------------------------------------------------------------- one loss evaluation

def compute_loss(model, loss_fn: REPALoss, batch: dict, *, scale, bias, feats: list[str], proj_coeff: float,
                 haste: HasteOnline | None = None):
    """Total loss and its logged parts [denoise, proj, attn] for one micro-batch (already on the device).

    RNG order (docs/reference.md §3.3): posterior eps, then (inside the loss) t on the CPU, noise, label drop.
    ``feats`` empty = no alignment (HASTE phase II). ``haste`` set = HASTE phase I: the online teacher
    gives the attention logits and the aligned features of teacher ``haste.teacher_index``.
    """
    x0 = R.sample_latents(batch[R.MOMENTS], scale, bias)
    return loss_from_latents(model, loss_fn, batch, x0, feats=feats, proj_coeff=proj_coeff, haste=haste)


def loss_from_latents(model, loss_fn: REPALoss, batch: dict, x0: torch.Tensor, *, feats: list[str],
                      proj_coeff: float, haste: HasteOnline | None = None, t=None, noise=None, drop=None):
    """:func:`compute_loss` given the posterior draw ``x0``; ``t``, ``noise`` and ``drop`` (the model's
    ``force_drop_ids``) fix the loss's own draws, as ``REPALoss`` allows (how a reference step is replayed)."""
    zs = [batch[f].float() if f in batch else None for f in feats] or None
    if haste is not None:
        online_feats, teacher_attn = haste.teacher_outputs(batch[haste.field])
        zs[haste.teacher_index] = online_feats.float()
    out = loss_fn(model, x0, batch[R.LABEL], zs, t=t, noise=noise, force_drop_ids=drop, return_attn=haste is not None)
    denoise, proj = out[0].mean(), out[1]
    loss = denoise + proj_coeff * proj
    attn = torch.zeros((), device=denoise.device)
    if haste is not None:
        attn = haste.loss(out[2], teacher_attn)
        loss = loss + haste.config.attn_coeff * attn
    return loss, torch.stack([denoise.detach(), proj.detach(), attn.detach()])


# ---------------------------------------------------------------- the loop


class BadRecordError(RuntimeError):
    """A corrupt record mid-run without --skip-bad: the run stopped after saving its last good step."""


def build_loader(cfg: TrainConfig, shards_url: str, fields, rank: int, world: int, micro_batch: int):
    """Each rank streams its own slice of the shard set, forever."""
    stream = ShardStream(shards_url, micro_batch, fields=fields, shuffle=True, seed=cfg.seed, infinite=True,
                         shuffle_window=cfg.shuffle_window, rank=rank, world_size=world, drop_last=True,
                         skip_bad=cfg.skip_bad, storage_options=cfg.storage_options or None)
    return make_loader(stream, num_workers=cfg.num_workers, **_worker_signals(cfg.requeue_signal))


def _worker_signals(requeue_signal: str | None) -> dict:
    """Reader workers ignore the stop signals (a signal to the process group reaches them too; the main process
    decides when to stop), the requeue signal included."""
    import inspect
    default = getattr(reader, "WORKER_IGNORED_SIGNALS", None)
    if default is None or "ignore_signals" not in inspect.signature(make_loader).parameters:
        return {}
    extra = preempt.parse_signal(requeue_signal)
    return {"ignore_signals": tuple(dict.fromkeys([*default, *([extra] if extra else [])]))}


class RngNeutral:
    """Iterates ``loader`` without ever touching the global CPU RNG (DataLoader draws its base seed from it
    when the iteration starts), so building, rebuilding or resuming a reader never shifts the training draws."""

    def __init__(self, loader):
        with torch.random.fork_rng(devices=[]):
            self.it = iter(loader)

    def __next__(self):
        with torch.random.fork_rng(devices=[]):
            return next(self.it)


class RankData:
    """This rank's micro-batches. The reader reads the fields of the current HASTE phase and is rebuilt, its
    position kept, at the switch. A corrupt record (ShardError, without --skip-bad) is kept in ``error`` and
    answered with all-zero batches, so this rank still joins the step's collectives and all ranks stop together
    after saving the last good step."""

    def __init__(self, cfg, shards_url, rank, world, micro_batch, fields_of, device, step):
        self.build = lambda fields: build_loader(cfg, shards_url, fields, rank, world, micro_batch)
        self.fields_of, self.device, self.micro_batch = fields_of, device, micro_batch
        self.fields = fields_of(step)
        self.loader = self.build(self.fields)
        self.it = None
        self.error: str | None = None
        self.skipped_before = 0  # records skipped by readers replaced at the HASTE switch

    def start(self, position: dict | None) -> None:
        if position is not None:
            self.loader.load_state_dict(position)
        self.it = RngNeutral(self.loader)

    def switch(self, step: int) -> bool:
        """Rebuild the reader if the step needs other fields (HASTE early stop); True if it did."""
        fields = self.fields_of(step)
        if fields == self.fields:
            return False
        position, self.skipped_before = self.loader.state_dict(), self.skipped
        self.fields, self.loader = fields, self.build(fields)
        self.start(position)
        return True

    @property
    def skipped(self) -> int:
        return self.skipped_before + self.loader.skipped

    def next(self) -> dict:
        if self.error is None:
            try:
                return {k: v.to(self.device, non_blocking=True) for k, v in next(self.it).items()}
            except ShardError as e:  # raised in a worker, re-raised here with the worker's traceback around it
                self.error = str(e).strip().splitlines()[-1].removeprefix("repa.shards.reader.ShardError: ")
        return self.zeros()

    def zeros(self) -> dict:
        specs = self.loader.stream.manifest.fields
        out = {f: decode_batch(torch.zeros(self.micro_batch, specs[f].nbytes, dtype=torch.uint8), specs[f])
               for f in self.loader.stream.fields}
        out["key"] = torch.full((self.micro_batch,), -1)
        return {k: v.to(self.device) for k, v in out.items()}


def make_accelerator(cfg: TrainConfig, log_with: str | None, find_unused: bool, project_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


# ---------------------------------------------------------------- set-up: everything that can be wrong fails here

@dataclass
class Plan:
    """What the flags and the shard manifest imply, checked before any process group or file is touched."""
    shards_url: str
    manifest: object
    model_kwargs: dict
    feats: list
    haste_on: bool
    log_with: str | None
    exp_dir: str
    ckpt_root: str


def plan_run(cfg: TrainConfig) -> Plan:
    guards.validate_flags(cfg)
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"--mixed-precision must be no|fp16|bf16, got {cfg.mixed_precision!r}")
    try:
        preempt.parse_signal(cfg.requeue_signal)
        shards_url = resolve_shards(cfg.shards, cfg.storage_options)
        manifest = read_manifest(shards_url, storage_options=cfg.storage_options or None)
        model_kwargs = (t2i.plan_t2i if t2i.is_t2i(manifest) else plan_model)(cfg, manifest, shards_url)
        log_with = check_report_to(cfg.report_to)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    guards.check_records(manifest, shards_url)
    prov = manifest.provenance
    haste_on = bool(prov.get("haste")) if cfg.haste is None else cfg.haste
    if haste_on and not prov.get("haste"):
        raise ConfigError(f"--haste needs shards written with repa-preprocess --haste; {shards_url} has "
                          f"provenance.haste = null")
    guards.check_preview_vae(cfg, prov)
    return Plan(shards_url, manifest, model_kwargs, teacher_fields(manifest), haste_on, log_with,
                os.path.join(cfg.output_dir, cfg.exp_name), ckpt.checkpoint_root(cfg.output_dir, cfg.exp_name))


def claim_experiment(cfg: TrainConfig, plan: Plan, accelerator, stack) -> dict:
    """Rank 0 takes the experiment's lock, checks the folders, picks the checkpoint, compares its flags and trims
    metrics.jsonl, all while holding the lock; every rank gets the decision (or the refusal) by broadcast.

    Returns {"path", "changes", "history", "loaded" (rank 0 only)}."""
    from accelerate.utils import broadcast_object_list
    decision, loaded, log, failed = {"error": None}, None, None, None
    if accelerator.is_main_process:
        try:
            guards.check_writable(plan.exp_dir, "output folder")
            lock = stack.enter_context(OutputLock(plan.exp_dir, stage="repa-train"))
            log = _make_logger(plan.exp_dir)
            stack.callback(_close_logger, log)
            if lock.previous:
                log.warning(f"took over the lock {lock.path} of a run that did not release it: {lock.previous}")
            if os.path.isdir(plan.ckpt_root):  # a refused resume must not leave an empty checkpoint folder behind
                guards.check_writable(plan.ckpt_root, "checkpoint folder")
            path, loaded = resume.choose_checkpoint(cfg.resume, plan.ckpt_root, log)
            identity = resume.data_identity(plan.manifest)
            changes = resume.resume_changes(loaded["config"], cfg, identity, path) if loaded else {}
            _check_model_kwargs(loaded, path, plan.model_kwargs)
            guards.check_writable(plan.ckpt_root, "checkpoint folder")
            resume.trim_metrics(os.path.join(plan.exp_dir, "metrics.jsonl"), _loaded_step(loaded), log)
            decision.update(path=path, changes=changes,
                            history=resume.history(loaded and loaded["config"], path, changes))
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            failed, decision["error"] = e, [type(e).__name__, str(e)]
    decision = broadcast_object_list([decision])[0]
    if failed is not None:
        raise failed
    if decision["error"]:
        kind, msg = decision["error"]
        raise {"LockHeld": LockHeld, "ConfigError": ConfigError}.get(kind, RuntimeError)(f"rank 0: {msg}")
    return {**decision, "loaded": loaded, "log": log}


def _loaded_step(loaded) -> int:
    return int(loaded["train_state"]["step"]) if loaded else 0


def _check_model_kwargs(loaded, path, model_kwargs) -> None:
    if loaded and loaded["config"]["model"]["kwargs"] != json.loads(json.dumps(model_kwargs)):
        raise ConfigError(f"--resume {path}: its model config {loaded['config']['model']['kwargs']} differs from "
                          f"this run's {model_kwargs}; use the same --model/--model-kwargs")


def restore(cfg, claim, model, ema, log) -> dict | None:
    """Weights into the model and EMA (before accelerate.prepare); returns the train state or None."""
    if not claim["path"]:
        if cfg.resume in (None, "auto"):
            log.info("no checkpoint in this experiment yet: starting from step 0")
        return None
    loaded = claim["loaded"] or ckpt.load_checkpoint(claim["path"])
    model.load_state_dict(loaded["model"])
    ema.load_state_dict(loaded["ema"])
    log.info(f"resuming from {claim['path']} (step {_loaded_step(loaded)})")
    for name, (old, new) in claim["changes"].items():
        log.info(f"resume: --{name.replace('_', '-')} {guards.show(old)} -> {guards.show(new)} (applied)")
    return loaded["train_state"]


def restore_optimizer(cfg, state, optimizer, accelerator) -> None:
    """Optimizer and scaler state, then this run's optimizer flags (applied on resume, resume.APPLIED_ON_RESUME)."""
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
    for group in optimizer.param_groups:
        group.update(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def restore_data(cfg, state, data, world, rank, step, log) -> None:
    """Per-rank seed, reader position and RNG state; a different world size or worker count restarts both."""
    from accelerate.utils import set_seed
    exact = exact_resume(state, cfg, world, rank, log)
    set_seed(cfg.seed + rank if state is None or exact else cfg.seed + rank + 1_000_003 * step)
    data.start(state["ranks"][rank]["loader"] if exact else None)
    if exact:
        ckpt.set_rng_state(state["ranks"][rank]["rng"])


def exact_resume(state, cfg, world, rank, log) -> bool:
    """A bitwise resume needs the same world size and worker count (the reader's slots); otherwise warn."""
    if state is None:
        return False
    was = (int(state.get("world_size", world)), int(state["ranks"][0]["loader"].get("num_workers", cfg.num_workers)))
    if was == (world, cfg.num_workers):
        return True
    log.warning(f"resume: the checkpoint was written by {was[0]} processes x {was[1]} reader workers, this run has "
                f"{world} x {cfg.num_workers}; weights and optimizer continue, the data order and RNG restart "
                f"(not bitwise-resumable)")
    return False


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns {"step", "checkpoint", "exp_dir"}."""
    plan = plan_run(cfg)  # flags, shards, dimensions, preview VAE: refused here, before any process group
    accelerator = make_accelerator(cfg, plan.log_with, find_unused=plan.haste_on, project_dir=plan.exp_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    micro_batch = _micro_batch(cfg, world)
    with ExitStack() as stack:
        # ---- setup: the experiment (lock, checkpoint, flag changes), model, optimizer, data
        claim = claim_experiment(cfg, plan, accelerator, stack)
        log = _rank_logger(claim, stack)
        _log_start(log, cfg, plan, world, device, micro_batch)
        model, ema, optimizer, haste = build_model(cfg, plan, accelerator, log)

        # ---- resume: weights before accelerate.prepare, optimizer/scaler after, then data position and RNG
        state = restore(cfg, claim, model, ema, log)
        step = int(state["step"]) if state else 0
        model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(model)
        ema.to(device)
        restore_optimizer(cfg, state, optimizer, accelerator)
        if haste is not None:
            haste.at(step)  # loads the teacher now if phase I is still ahead: fails fast, before step 1
        t2i_run = t2i.T2IInputs(plan, cfg) if t2i.is_t2i(plan.manifest) else None  # captions + CFG drop per step
        extra = t2i_run.read_fields if t2i_run else []  # text.<k> + num_captions
        fields = (lambda s: haste.fields(s, plan.feats)) if haste else (lambda s: [R.MOMENTS, *plan.feats, *extra])
        data = RankData(cfg, plan.shards_url, rank, world, micro_batch, fields, device, step)
        restore_data(cfg, state, data, world, rank, step, log)
        saver = ckpt.Checkpointer(accelerator, plan.ckpt_root, raw_model, ema, optimizer,
                                  lambda: data.loader.state_dict(), _run_config(cfg, plan, claim),
                                  cfg.keep_last, claim["path"], step if claim["path"] else None)
        step_once = StepRunner(cfg, plan, accelerator, model, raw_model, ema, optimizer, data, haste, saver)
        step_once.t2i = t2i_run
        out = RunLog(cfg, plan.exp_dir, accelerator, plan.log_with, "REPA" if haste is None else "HASTE", log,
                     step, lambda: (t2i_run.preview if t2i_run else Preview)(cfg, plan.model_kwargs,
                                                                              plan.manifest.provenance, device), stack)
        stop = preempt.StopFlag(cfg.requeue_signal).install()
        stack.callback(stop.restore)

        # ---- the loop: step, log, checkpoint, stop
        model.train()
        while step < cfg.max_train_steps:
            if data.switch(step):  # HASTE stage-wise termination: denoising only, no teacher I/O from here on
                log.info(f"step {step}: HASTE early stop, alignment off; reading only {data.fields}")
            record, stopping = step_once(step, stop)  # raises on a non-finite loss, or a bad record (after saving)
            step += 1
            out.step(record)
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps or stopping:
                log.info(f"step {step}: saved checkpoint {saver.save(step)}")
            out.maybe_preview(ema, step)
            if stopping:
                log.info(f"step {step}: stop signal received: {stop.received or 'on another rank'}; "
                         f"exiting after checkpoint {saver.last}")
                break
        if saver.saved_at != step:  # e.g. resumed at/after max_train_steps
            saver.save(step)
    return {"step": step, "checkpoint": saver.last, "exp_dir": plan.exp_dir}


class StepRunner:
    """One optimizer step on every rank: micro-batches -> loss -> backward -> ONE all-reduce (losses, stop flag,
    bad-record flag, skipped count) -> non-finite check -> clip -> AdamW -> EMA. Returns (metrics record, stop?)."""

    def __init__(self, cfg, plan, accelerator, model, raw_model, ema, optimizer, data, haste, saver):
        self.cfg, self.plan, self.accelerator, self.model, self.raw_model = cfg, plan, accelerator, model, raw_model
        self.ema, self.optimizer, self.data, self.haste, self.saver = ema, optimizer, data, haste, saver
        self.loss_fn = REPALoss(prediction=cfg.prediction, path_type=cfg.path_type, weighting=cfg.weighting)
        self.scale, self.bias = _latent_affine(plan.manifest.provenance, plan.model_kwargs, accelerator.device)
        self.t_last = time.perf_counter()
        self.t2i = None  # text-to-image runs: trainer/mmdit.T2IInputs

    def __call__(self, step: int, stop) -> tuple[dict, bool]:
        cfg, acc, accum, world = self.cfg, self.accelerator, self.cfg.gradient_accumulation_steps, self.accelerator.num_processes
        phase1 = self.haste.at(step) if self.haste is not None else None
        align = self.haste is None or phase1 is not None
        before = self.saver.snapshot()  # RNG + reader position (host-side copies, no device sync): saved if this
        # step turns out void (a corrupt record), so the checkpoint is exactly the state after the last good step
        stats = torch.zeros(3, device=acc.device)
        batches = []  # kept only to name the cause if the loss is not finite
        for micro in range(accum):
            batch = self.data.next()
            if self.t2i is not None:  # the drawn caption (or the empty one, CFG) takes the label's place
                batch["label"] = self.t2i.context(batch)
            batches.append(batch)
            with nullcontext() if micro == accum - 1 else acc.no_sync(self.model):  # DDP all-reduce once per step
                model = self.t2i.wrap(self.model) if self.t2i is not None else self.model
                loss, parts = compute_loss(model, self.loss_fn, batch, scale=self.scale, bias=self.bias,
                                           feats=self.plan.feats if align else [],
                                           proj_coeff=cfg.proj_coeff if align else 0.0, haste=phase1)
                acc.backward(loss / accum)
            stats += parts / accum
        # clip before the all-reduce so the grad norm rides along (gradients are already identical on every rank
        # after DDP's backward; a step that turns out void below never uses them)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm).reshape(1).float()
        flags = torch.tensor([float(stop.set), float(self.data.error is not None), float(self.data.skipped)])
        # the step's one collective and its one forced host sync (.tolist(): the values steer every rank's control
        # flow and the log): losses, grad norm, stop flag, bad-record flag, skipped-record count
        reduced = acc.reduce(torch.cat([stats, grad_norm, flags.to(acc.device, non_blocking=True)]),
                             reduction="sum").tolist()
        denoise, proj, attn, grad_norm = (v / world for v in reduced[:4])
        stopping, bad, skipped = reduced[4] > 0, reduced[5] > 0, int(reduced[6])
        if bad:  # a corrupt record on some rank: this step is void; save the last good one, stop
            self.optimizer.zero_grad(set_to_none=True)
            if step and self.saver.saved_at != step:
                self.saver.save(step, before)
            raise BadRecordError(_bad_record_msg(self.data.error, step, self.saver.last, self.plan.shards_url))
        if not all(math.isfinite(v) for v in (denoise, proj, attn)):
            raise NonFiniteLossError(_nonfinite_msg(step + 1, denoise, proj, self.saver.last,
                                                    cause=_nonfinite_cause(batches, self.plan.shards_url)))
        if not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":  # fp16: the scaler skips the step
            raise NonFiniteLossError(_nonfinite_msg(step + 1, denoise, proj, self.saver.last, grad_norm,
                                                    cause=_nonfinite_cause(batches, self.plan.shards_url)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.raw_model, cfg.ema_decay)
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        record = {"step": step + 1, "loss": denoise, "proj_loss": proj, "grad_norm": grad_norm,
                  "lr": self.optimizer.param_groups[0]["lr"], "steps_per_s": 1 / dt,
                  "samples_per_s": cfg.batch_size / dt, "skipped_records": skipped}
        if self.haste is not None:
            record["attn_loss"] = attn
        return record, stopping

# ---------------------------------------------------------------- helpers

def build_model(cfg, plan, accelerator, log):
    """SiT, its EMA, the HASTE teacher plan and AdamW: the same init on every rank (seed, not seed + rank)."""
    torch.manual_seed(cfg.seed)
    model = (t2i.MMDiT if t2i.is_t2i(plan.manifest) else SiT)(**plan.model_kwargs)
    model.grad_checkpointing = cfg.grad_checkpointing
    ema = make_ema(model)
    haste = setup_haste(plan.manifest.provenance, plan.model_kwargs, cfg.attn_coeff, cfg.early_stop_point,
                        accelerator.device, accelerator.autocast) if plan.haste_on else None
    if cfg.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    log.info(f"{cfg.model} {json.dumps(plan.model_kwargs)}: {sum(p.numel() for p in model.parameters()):,} "
             f"parameters")
    return model, ema, optimizer, haste


def _micro_batch(cfg, world: int) -> int:
    accum = cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * accum):
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) must be divisible by processes ({world}) x "
                          f"--gradient-accumulation-steps ({accum})")
    return cfg.batch_size // (world * accum)


def _rank_logger(claim, stack) -> logging.Logger:
    """Rank 0's logger (opened under the lock by claim_experiment); other ranks log warnings only."""
    if claim["log"] is not None:
        return claim["log"]
    log = _make_logger(None)
    stack.callback(_close_logger, log)
    return log


def _run_config(cfg, plan, claim) -> dict:
    """config.json of every checkpoint (its "step" is added at save time)."""
    return {"model": {"name": cfg.model, "kwargs": plan.model_kwargs}, "data": plan.manifest.provenance,
            "args": cfg.to_json(), "data_identity": resume.data_identity(plan.manifest), "history": claim["history"],
            "repa_version": _version()}


def _latent_affine(prov, model_kwargs, device):
    vae = prov.get("vae") or {}
    c = model_kwargs["in_channels"]
    scale = torch.tensor(vae.get("scale", [1.0] * c), device=device).view(1, -1, 1, 1)
    bias = torch.tensor(vae.get("bias", [0.0] * c), device=device).view(1, -1, 1, 1)
    return scale, bias


def _log_start(log, cfg, plan, world, device, micro_batch):
    m = plan.manifest
    log.info(f"processes={world} device={device} mixed_precision={cfg.mixed_precision} "
             f"global_batch={cfg.batch_size} micro_batch={micro_batch} grad_accum={cfg.gradient_accumulation_steps}")
    log.info(f"shards {plan.shards_url}: {m.num_records} records, latent {tuple(m.fields['moments'].shape)}, "
             f"teachers {plan.feats}, vae {(m.provenance.get('vae') or {}).get('id')}")
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _bad_record_msg(error: str | None, step: int, last_ckpt: str | None, shards_url: str) -> str:
    what = error or f"another rank read a corrupt record of {shards_url} (its log names the shard and key)"
    saved = (f"saved checkpoint {last_ckpt} (step {step}, the last good step)" if last_ckpt
             else "no step was completed, nothing to save")
    return (f"{what}. Stopped; {saved}. Re-create that shard (delete it and rerun repa-preprocess: it redoes "
            f"missing shards), or pass --skip-bad to skip and count bad records; then rerun the same command "
            f"to resume")


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


def _close_logger(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("repa")
    except Exception:  # noqa: BLE001
        return "0.1.0"
