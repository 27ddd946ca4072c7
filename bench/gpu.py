"""One-command device check: speed, memory and correctness of repa on one CUDA GPU, in <= 5 minutes.

    python bench/gpu.py            # (make gpu-check) on a CUDA machine: real shapes, ~300 s budget
    python bench/gpu.py --quick    # the whole script on CPU with tiny shapes (tests/test_bench_gpu.py runs it)

Real architectures with random weights, data generated in place, nothing downloaded: SiT-XL/2 and SiT-B/2 at
256 px (repa.trainer.models), the REPA/HASTE loss and step (repa.trainer), an SD-VAE-config diffusers
AutoencoderKL, a DINOv2-B timm ViT (repa.preprocess.teachers.Teacher), repa.sampler's solvers.

Each section runs in its own forked process with its own time budget (a hung compile or a CUDA error in one
section cannot lose the others); every measurement is sent to the parent as soon as it is taken, so a section
killed at its deadline still reports what it finished. The last line printed is one JSON object; the keys are
described in BENCHMARKS.md ("GPU"). Exit status 1 if a correctness check failed or could not run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The parent must never initialise CUDA (its sections are child processes): the NVML-based availability check
# answers torch.cuda.is_available() without creating a CUDA context.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

GIB = 2 ** 30
SDE = dict(cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)  # the REPA paper's evaluation sampler
NOMINAL_SDE_STEPS = 250


# ---------------------------------------------------------------- shapes

@dataclass
class Shapes:
    """Everything size-dependent. ``full()`` is the paper setting, ``quick()`` a tiny CPU stand-in."""
    quick: bool
    res: int
    batch: int                      # per-GPU training batch (the recipe: 256 global / 8 GPUs)
    warmup: int
    steps: int
    xl2: tuple                      # (registry name, SiT overrides, encoder_depth)
    b2: tuple
    teacher: tuple                  # (timm name, kwargs)
    vae: dict                       # AutoencoderKL kwargs
    ref_workers: int = 4            # the reference train.py's DataLoader workers
    ref_images: int = 256
    pre_batch: int = 64
    pre_images: int = 1024
    pre_workers: int = 8
    sample_batches: tuple = (64, 256)
    sample_steps: int = 50          # measured SDE steps; images/s are scaled to a 250-step run
    check_model: tuple = ("SiT-B/2", {"depth": 4}, 4)
    budgets: dict = field(default_factory=dict)

    @property
    def latent(self) -> int:
        return self.res // 8


SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


def full_shapes() -> Shapes:
    return Shapes(quick=False, res=256, batch=32, warmup=3, steps=10,
                  xl2=("SiT-XL/2", {}, 8), b2=("SiT-B/2", {}, 4),
                  teacher=("vit_base_patch14_dinov2", {"img_size": 224}), vae=dict(SD_VAE),
                  budgets={"correctness": 40, "train_xl2": 45, "train_b2": 25, "haste": 25, "sampling": 45,
                           "preprocess": 35, "compile": 150})  # compile: whatever is left, up to 150 s


def quick_shapes() -> Shapes:
    tiny = {"depth": 2, "hidden_size": 64, "num_heads": 2, "projector_dim": 64}
    return Shapes(quick=True, res=64, batch=4, warmup=1, steps=1,
                  xl2=("SiT-S/2", tiny, 2), b2=("SiT-S/2", dict(tiny, hidden_size=32, projector_dim=32), 1),
                  teacher=("vit_small_patch14_dinov2", {"embed_dim": 64, "depth": 6, "num_heads": 2, "img_size": 56}),
                  vae=dict(SD_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64),
                  ref_workers=2, ref_images=8, pre_batch=4, pre_images=8, pre_workers=1, sample_batches=(2, 4),
                  sample_steps=2, check_model=("SiT-S/2", tiny, 2),
                  budgets={k: 90 for k in ("correctness", "train_xl2", "train_b2", "haste", "sampling",
                                           "preprocess", "compile")})


# ---------------------------------------------------------------- child-side helpers

class Ctx:
    """What a section gets: shapes, device, a deadline, and ``emit`` to report results as they come."""

    def __init__(self, shapes: Shapes, device: torch.device, deadline: float, conn, args, section: str = ""):
        self.s, self.device, self.deadline, self.conn, self.args = shapes, device, deadline, conn, args
        self.section = section
        self.cuda = device.type == "cuda"

    def emit(self, **kv) -> None:
        self.conn.send(("result", kv))
        if self.args.hang == self.section:  # test hook: a section that hangs after its first measurement
            time.sleep(3600)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        """Peak CUDA memory allocated since reset_peak (GPU), or this process's peak RSS (CPU, --quick)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.cuda else t

    def autocast(self, precision: str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def attempt(self, name: str, fn):
        """Run one measurement; a failure is reported (with its traceback tail) and the section goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported in the JSON, never swallowed silently
            self.conn.send(("error", {name: f"{type(e).__name__}: {e}"[:400],
                                      f"{name}_traceback": traceback.format_exc()[-1500:]}))
            if self.cuda:
                torch.cuda.empty_cache()
            return None


def build_sit(ctx: Ctx, spec: tuple, *, z_dim: int, device=None, **kw):
    """A SiT built directly on the device (no slow CPU init of 675M parameters)."""
    from repa.trainer.models import SiT, model_config
    name, overrides, enc = spec
    cfg = model_config(name, **overrides, input_size=ctx.s.latent, z_dims=[z_dim], encoder_depth=enc, **kw)
    with torch.device(device or ctx.device):
        model = SiT(**cfg)
    return model, cfg


def perturb(model, seed: int = 0, std: float = 0.02) -> None:
    """Random non-zero weights everywhere (adaLN-Zero init makes every block the identity and v = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))


def build_teacher(ctx: Ctx, device=None):
    import timm
    from repa.preprocess.teachers import Teacher
    name, kw = ctx.s.teacher
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    return Teacher(model, name=f"{name}(random)", model_id=None, resolution=ctx.s.res, device=device or ctx.device)


def build_vae(ctx: Ctx):
    from diffusers import AutoencoderKL
    from repa.preprocess.vae import DiffusersVAE
    torch.manual_seed(0)
    vae = DiffusersVAE(AutoencoderKL(**ctx.s.vae).to(ctx.device), "sd-vae-config(random)")
    if ctx.cuda:
        vae.vae.to(memory_format=torch.channels_last)
    return vae


def cached_batches(ctx: Ctx, n: int, z_dim: int, tokens: int, extra: dict | None = None) -> list[dict]:
    """n pinned host batches like the shard loader yields: moments fp32, label, feat.0 bf16 (+ extra)."""
    g = torch.Generator().manual_seed(0)
    B, L = ctx.s.batch, ctx.s.latent
    out = []
    for _ in range(n):
        b = {"moments": torch.cat([torch.randn(B, 4, L, L, generator=g), 0.1 * torch.rand(B, 4, L, L, generator=g)], 1),
             "label": torch.randint(1000, (B,), generator=g),
             "feat.0": torch.randn(B, tokens, z_dim, generator=g).to(torch.bfloat16)}
        for k, shape in (extra or {}).items():
            b[k] = torch.randn(B, *shape, generator=g).to(torch.float16)
        out.append({k: ctx.pin(v) for k, v in b.items()})
    return out


def time_steps(ctx: Ctx, step, feed, warmup: int, steps: int) -> float:
    """Seconds per step: ``warmup`` untimed steps, then ``steps`` timed between two device syncs."""
    for _ in range(warmup):
        step(feed())
    ctx.sync()
    t = time.perf_counter()
    for _ in range(steps):
        step(feed())
    ctx.sync()
    return (time.perf_counter() - t) / steps


# ---------------------------------------------------------------- training steps

class Trainee:
    """SiT + EMA + AdamW exactly as repa-train builds them (docs/reference.md §3.1), on the device."""

    def __init__(self, ctx: Ctx, spec: tuple, z_dim: int):
        from repa.trainer.ema import make_ema
        from repa.trainer.loss import REPALoss
        torch.manual_seed(0)
        self.model, self.cfg = build_sit(ctx, spec, z_dim=z_dim)
        self.model.train()
        self.ema = make_ema(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0, eps=1e-8)
        self.loss_fn = REPALoss()
        self.scale = torch.full((1, 4, 1, 1), 0.18215, device=ctx.device)
        self.bias = torch.zeros((1, 4, 1, 1), device=ctx.device)
        self.params = sum(p.numel() for p in self.model.parameters())


def make_step(ctx: Ctx, tr: Trainee, precision: str, *, feats=("feat.0",), proj_coeff=0.5, haste=None):
    """One optimizer step of repa-train's StepRunner (compute_loss, backward, clip 1.0, AdamW, EMA, the one
    per-step host sync of the logged losses and grad norm). fp16 uses a GradScaler, as accelerate does for the recipe;
    accelerate's autocast-wrapped forward is written here as an explicit torch.autocast of the same dtype."""
    from repa.trainer.ema import update_ema
    from repa.trainer.train import compute_loss
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    model, opt = tr.model, tr.opt

    def step(batch):
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        with ctx.autocast(precision):
            loss, parts = compute_loss(model, tr.loss_fn, batch, scale=tr.scale, bias=tr.bias, feats=list(feats),
                                       proj_coeff=proj_coeff, haste=haste)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(tr.ema, getattr(model, "_orig_mod", model))
        torch.cat([parts, gn.reshape(1).float()]).tolist()  # repa-train's one host sync per step (losses, norm)
    return step


def run_ours(ctx: Ctx, tr: Trainee, precision: str, batches: list[dict], tag: str, **kw) -> float:
    """images/s and peak memory of our step on cached latents + features; emits ``<tag>_img_s``/``_peak_gib``."""
    step = make_step(ctx, tr, precision, **kw)
    it = iter(range(10 ** 9))
    feed = lambda: batches[next(it) % len(batches)]  # noqa: E731
    ctx.reset_peak()
    sec = time_steps(ctx, step, feed, ctx.s.warmup, ctx.s.steps)
    img_s = ctx.s.batch / sec
    ctx.emit(**{f"{tag}_img_s": img_s, f"{tag}_step_ms": sec * 1e3, f"{tag}_peak_gib": ctx.peak_gib()})
    return img_s


# ---------------------------------------------------------------- the reference-style step

class PngDataset(torch.utils.data.Dataset):
    """REPA's dataset.py item: uint8 image decoded with PIL (+ the moments .npy when cached), label.

    The length is virtual (files repeat) so no epoch boundary, with its worker restart stall, falls inside
    the timed steps: a real ImageNet epoch is 5000 steps long."""

    def __init__(self, root: str, n: int, with_moments: bool):
        self.root, self.n, self.with_moments = root, n, with_moments

    def __len__(self):
        return 10 ** 6

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image
        k = i % self.n
        with open(os.path.join(self.root, f"img{k:08d}.png"), "rb") as f:
            image = torch.from_numpy(np.array(Image.open(f).convert("RGB")).transpose(2, 0, 1).copy())
        moments = torch.from_numpy(np.load(os.path.join(self.root, f"img-mean-std-{k:08d}.npy"))) \
            if self.with_moments else torch.zeros(())
        return image, moments, torch.tensor(k % 1000)


def write_reference_files(ctx: Ctx, root: str) -> None:
    """Uncompressed PNGs + float32 moments .npy, as REPA's dataset_tools writes them."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    L = ctx.s.latent
    for k in range(ctx.s.ref_images):
        small = rng.integers(0, 256, (ctx.s.res // 8, ctx.s.res // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((ctx.s.res, ctx.s.res), Image.BILINEAR).save(
            os.path.join(root, f"img{k:08d}.png"), compress_level=0)
        moments = np.concatenate([rng.standard_normal((4, L, L)), 0.1 * rng.random((4, L, L))]).astype(np.float32)
        np.save(os.path.join(root, f"img-mean-std-{k:08d}.npy"), moments)


def reference_loader(ctx: Ctx, root: str, with_moments: bool):
    dl = torch.utils.data.DataLoader(PngDataset(root, ctx.s.ref_images, with_moments), batch_size=ctx.s.batch,
                                     shuffle=True, num_workers=ctx.s.ref_workers, pin_memory=ctx.cuda,
                                     drop_last=True, persistent_workers=True)
    return iter(dl)


def make_reference_step(ctx: Ctx, tr: Trainee, teacher, vae, loader):
    """REPA train.py's step: fp16 autocast + GradScaler, the teacher (and, with ``vae``, the VAE encoder)
    run online under no_grad on the decoded images, then the same loss, clip, AdamW and EMA."""
    from repa.trainer.ema import update_ema
    from repa.trainer.train import compute_loss
    scaler = torch.amp.GradScaler(ctx.device.type)
    model, opt = tr.model, tr.opt

    def step(_):
        images, moments, y = next(loader)
        images = images.to(ctx.device, non_blocking=True)
        with torch.no_grad(), ctx.autocast("fp16"):
            if vae is not None:
                x = (images.float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
                dist = vae.vae.encode(x).latent_dist
                moments = torch.cat([dist.mean, dist.std], dim=1).float()
            else:
                moments = moments.to(ctx.device, non_blocking=True)
            feats = teacher(images)
        batch = {"moments": moments, "label": y.to(ctx.device, non_blocking=True), "feat.0": feats}
        with ctx.autocast("fp16"):
            loss, parts = compute_loss(model, tr.loss_fn, batch, scale=tr.scale, bias=tr.bias, feats=["feat.0"],
                                       proj_coeff=0.5)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(tr.ema, model)
        parts.tolist(), float(gn)  # the reference logs loss.item() and grad_norm.item(): two host syncs
    return step


def run_reference(ctx: Ctx, tr: Trainee, teacher, vae, root: str, tag: str) -> float:
    loader = reference_loader(ctx, root, with_moments=vae is None)
    step = make_reference_step(ctx, tr, teacher, vae, loader)
    ctx.reset_peak()
    sec = time_steps(ctx, step, lambda: None, ctx.s.warmup + 1, ctx.s.steps)  # +1: worker start-up
    img_s = ctx.s.batch / sec
    ctx.emit(**{f"{tag}_img_s": img_s, f"{tag}_step_ms": sec * 1e3, f"{tag}_peak_gib": ctx.peak_gib()})
    del loader
    return img_s


# ---------------------------------------------------------------- sections (each runs in its own process)

def section_train(ctx: Ctx, which: str) -> None:
    """Our step (bf16 and fp16+GradScaler) vs the reference-style step, one model, same GPU, same run."""
    spec = ctx.s.xl2 if which == "xl2" else ctx.s.b2
    teacher = build_teacher(ctx)
    tr = Trainee(ctx, spec, teacher.embed_dim)
    ctx.emit(**{f"{which}_params": tr.params, f"{which}_batch": ctx.s.batch})
    batches = cached_batches(ctx, 4, teacher.embed_dim, teacher.num_tokens)
    for prec in ("bf16", "fp16"):
        ctx.attempt(f"{which}_ours_{prec}", lambda p=prec: run_ours(ctx, tr, p, batches, f"{which}_ours_{p}"))
    batches.clear()  # free the pinned pool before the reference step's loader starts
    with tempfile.TemporaryDirectory(prefix="repa-gpu-ref-") as root:
        write_reference_files(ctx, root)
        vae = build_vae(ctx)
        ctx.attempt(f"{which}_reference", lambda: run_reference(ctx, tr, teacher, vae, root, f"{which}_reference"))
        ctx.attempt(f"{which}_reference_cached_moments", lambda: run_reference(
            ctx, tr, teacher, None, root, f"{which}_reference_cached_moments"))


def section_compile(ctx: Ctx) -> None:
    """SiT-XL/2 bf16 step eager, then after ``model.compile()`` (what ``repa-train --compile`` does)."""
    teacher_dim, tokens = teacher_shape(ctx)
    tr = Trainee(ctx, ctx.s.xl2, teacher_dim)
    batches = cached_batches(ctx, 4, teacher_dim, tokens)
    run_ours(ctx, tr, "bf16", batches, "compile_eager")
    tr.model.compile(backend=ctx.args.compile_backend)
    step = make_step(ctx, tr, "bf16")
    t = time.perf_counter()
    step(batches[0])  # the compile happens here (forward and backward graphs)
    ctx.sync()
    ctx.emit(compile_first_step_s=time.perf_counter() - t, compile_backend=ctx.args.compile_backend)
    run_ours(ctx, tr, "bf16", batches, "compile_compiled")


def teacher_shape(ctx: Ctx) -> tuple[int, int]:
    """(feature dim, tokens) of the teacher without building it: DINOv2 patch 14 on a res/16 grid."""
    dim = ctx.s.teacher[1].get("embed_dim", 768)
    return dim, (ctx.s.res // 16) ** 2


def section_haste(ctx: Ctx) -> None:
    """HASTE phase I (cached residual + the teacher's last blocks online + attention loss) and the step after
    the early stop (denoising only), against the REPA step; SiT-XL/2, bf16, same batches."""
    from repa.trainer.haste import HasteOnline, default_haste_config
    teacher = build_teacher(ctx)
    tr = Trainee(ctx, ctx.s.xl2, teacher.embed_dim)
    c = tr.cfg
    cfg = default_haste_config(c["encoder_depth"], c["num_heads"], teacher.depth, teacher.num_heads)
    cfg.validate(c["depth"], c["num_heads"], c["encoder_depth"], teacher.depth, teacher.num_heads)
    haste = HasteOnline(config=cfg, field="haste.0", teacher_index=0, start_block=cfg.first_teacher_block,
                        load_teacher=lambda: teacher, autocast=lambda: ctx.autocast("bf16"), teacher=teacher)
    residual = (teacher.num_prefix_tokens + teacher.num_tokens, teacher.embed_dim)
    pool = cached_batches(ctx, 4, teacher.embed_dim, teacher.num_tokens, extra={"haste.0": residual})
    only = lambda drop: [{k: v for k, v in b.items() if k not in drop} for b in pool]  # noqa: E731
    ctx.emit(haste_student_blocks=list(cfg.student_blocks), haste_teacher_blocks=list(cfg.teacher_blocks))
    ctx.attempt("haste_repa", lambda: run_ours(ctx, tr, "bf16", only({"haste.0"}), "haste_repa"))
    ctx.attempt("haste_phase1", lambda: run_ours(ctx, tr, "bf16", only({"feat.0"}), "haste_phase1", haste=haste))
    ctx.attempt("haste_after_stop", lambda: run_ours(ctx, tr, "bf16", only({"feat.0", "haste.0"}),
                                                     "haste_after_stop", feats=(), proj_coeff=0.0))


class SamplerBench:
    """The two ways of generating a batch with the same model and sampler, and their timing."""

    def __init__(self, ctx: Ctx):
        from repa.sampler.generate import LatentDecoder
        self.ctx, self.L, self.S = ctx, ctx.s.latent, ctx.s.sample_steps
        self.model, _ = build_sit(ctx, ctx.s.xl2, z_dim=teacher_shape(ctx)[0], fused_attn=False)
        self.model.eval().requires_grad_(False)
        self.heads = self.model.projectors
        self.decoder = LatentDecoder(build_vae(ctx), [0.18215] * 4, [0.0] * 4, ctx.device)

    def ours(self, B: int, steps: int):
        """repa-sample: per-index noise and SDE generators (batch-independent samples), projector heads dropped."""
        from repa.sampler import euler_maruyama_sampler
        from repa.sampler.generate import STREAM_SDE, initial_noise, make_labels, sample_generator
        self.model.projectors = torch.nn.ModuleList()
        idx = list(range(B))
        z = initial_noise(idx, 0, (4, self.L, self.L)).to(self.ctx.device)
        y = torch.from_numpy(make_labels(B, 0, 1000)).to(self.ctx.device)
        gens = [sample_generator(0, i, STREAM_SDE) for i in idx]
        return euler_maruyama_sampler(self.model, z, y, num_steps=steps, noise_generators=gens, **SDE)

    def reference(self, B: int, steps: int):
        """generate.py: z and y from the global CUDA RNG, the full model, the SDE noise from randn_like."""
        from repa.sampler import euler_maruyama_sampler
        self.model.projectors = self.heads
        z = torch.randn(B, 4, self.L, self.L, device=self.ctx.device)
        y = torch.randint(0, 1000, (B,), device=self.ctx.device)
        return euler_maruyama_sampler(self.model, z, y, num_steps=steps, **SDE)

    def timed(self, fn, B: int) -> tuple[float, float, float]:
        """(images/s of a 250-step run incl. one decode, seconds of the S timed steps, decode seconds)."""
        fn(B, 2)  # warm-up: kernels, cuBLAS workspaces, allocator
        self.ctx.sync()
        t = time.perf_counter()
        x = fn(B, self.S)
        self.ctx.sync()
        t_s = time.perf_counter() - t
        t = time.perf_counter()
        self.decoder(x.float())  # returns host uint8: the device work is done when it returns
        t_d = time.perf_counter() - t
        return B / (t_s * NOMINAL_SDE_STEPS / self.S + t_d), t_s, t_d


def section_sampling(ctx: Ctx) -> None:
    """250-step SDE, CFG 1.8 on t <= 0.7 (the paper's FID sampler), SiT-XL/2: repa-sample's way vs generate.py's
    loop, explicit-softmax attention and TF32 on both sides (their defaults). ``sample_steps`` steps are timed
    and scaled to 250 (every step costs the same; the CFG fraction is a fraction of the time grid, so it is the
    same); one VAE decode per batch is added to both."""
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # generate.py's --tf32 default and repa-sample's
        torch.backends.cudnn.allow_tf32 = True
    sb = SamplerBench(ctx)
    ctx.emit(sample_steps_measured=sb.S, sample_steps_nominal=NOMINAL_SDE_STEPS)
    for B in ctx.s.sample_batches:
        spent = 0.0
        for name, fn in (("reference", sb.reference), ("ours", sb.ours)):
            img_s, t_s, t_d = sb.timed(fn, B)
            spent += t_s * (1 + 2 / sb.S) + t_d
            ctx.emit(**{f"sample_b{B}_{name}_img_s": img_s, f"sample_b{B}_{name}_sampler_s": t_s,
                        f"sample_b{B}_decode_s": t_d})
        if B == ctx.s.sample_batches[0]:
            sb.model.set_fused_attn(True)
            ctx.attempt("sample_fused", lambda: ctx.emit(sample_fused_attn_img_s=sb.timed(sb.ours, B)[0]))
            sb.model.set_fused_attn(False)
        if B != ctx.s.sample_batches[-1] and ctx.left() < 1.5 * spent * ctx.s.sample_batches[-1] / B:
            ctx.emit(sample_skipped=f"batches after {B}: not enough time left in the section budget")
            break


def section_preprocess(ctx: Ctx) -> None:
    """repa-preprocess end to end (JPEG decode + ADM crop in workers, SD-VAE + DINOv2-B, shard writing) vs the
    two models alone on decoded crops, batch 64, same run."""
    from pathlib import Path
    from repa.preprocess.pipeline import Models, Options, run
    with tempfile.TemporaryDirectory(prefix="repa-gpu-pre-") as tmp:
        root = Path(tmp)
        vae_dir, enc = save_models(ctx, root)
        img_dir = make_jpegs(root, ctx.s.pre_images)
        base = dict(source=f"imagefolder:{img_dir}", res=ctx.s.res, vae=vae_dir, enc_type=enc,
                    batch_size=ctx.s.pre_batch, num_workers=ctx.s.pre_workers, progress=False, shard_size=256,
                    device=str(ctx.device))
        models = Models(resolved(Options(**base), ctx.device), ctx.device)
        g = torch.Generator().manual_seed(0)
        crops = [ctx.pin(torch.randint(0, 256, (ctx.s.pre_batch, 3, ctx.s.res, ctx.s.res), dtype=torch.uint8,
                                       generator=g)) for _ in range(2)]
        models(crops[0])
        n = max(2, ctx.s.pre_images // ctx.s.pre_batch // 2)
        ctx.sync()
        t = time.perf_counter()
        for i in range(n):
            models(crops[i % 2])  # returns CPU tensors: the device work is finished when it returns
        ctx.emit(pre_model_only_img_s=n * ctx.s.pre_batch / (time.perf_counter() - t))
        del models
        summary = run(Options(**base, out=str(root / "out")), echo=lambda m: None)
        ctx.emit(pre_end_to_end_img_s=summary["images_per_s"], pre_images=ctx.s.pre_images,
                 pre_workers=ctx.s.pre_workers)


def resolved(opts, device):
    """The options as repa-preprocess resolves them for this device (precision auto -> fp16 on CUDA)."""
    from repa.preprocess.pipeline import _resolve
    return _resolve(opts, device)


def save_models(ctx: Ctx, root) -> tuple[str, str]:
    """The SD-VAE-config AutoencoderKL and the DINOv2 ViT saved as local dirs, loaded back by the users' path."""
    import timm
    from diffusers import AutoencoderKL
    from timm.models import save_for_hf
    torch.manual_seed(0)
    AutoencoderKL(**ctx.s.vae).save_pretrained(str(root / "vae"))
    name, kw = ctx.s.teacher
    save_for_hf(timm.create_model(name, pretrained=False, num_classes=0, **kw), str(root / "teacher"),
                model_args=kw, safe_serialization=True)
    return str(root / "vae"), f"timm:local-dir:{root / 'teacher'}"


def make_jpegs(root, n: int):
    """ImageNet-like JPEGs (~500x375, quality 90, smooth content) in 4 class folders."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        d = root / "images" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)
    return root / "images"


# ---------------------------------------------------------------- correctness (assertions)

TOL = {  # stated tolerances; the observed values are reported next to them
    "loss_fp32_device_vs_cpu_rel": 1e-4,     # same weights and draws: kernels differ only in summation order
    "loss_bf16_vs_fp32_rel": 3e-2,           # bf16 keeps 8 mantissa bits: ~0.4% per op, partly averaged out
    "loss_fp16_vs_fp32_rel": 1e-2,
    "proj_bf16_vs_fp32_abs": 2e-2,           # the projection loss is -cosine similarity, in [-1, 0]
    "proj_fp16_vs_fp32_abs": 5e-3,
    "sampler_device_vs_cpu_abs": 2e-3,       # max |x| difference after the SDE, fp32, TF32 off, same noise
}


EXPECTED_CHECKS = ("loss_fp32_device_vs_cpu_rel", "loss_bf16_vs_fp32_rel", "proj_bf16_vs_fp32_abs",
                   "loss_fp16_vs_fp32_rel", "proj_fp16_vs_fp32_abs", "sampler_device_vs_cpu_abs",
                   "train_20_steps_loss_decreases", "checkpoint_round_trip_bitwise")


def check(ctx: Ctx, name: str, value: float, tol: float) -> None:
    tol = tol * ctx.args.tol_scale
    ok = bool(math.isfinite(value) and value <= tol)
    ctx.conn.send(("check", {name: {"ok": ok, "value": value, "tol": tol}}))


def section_correctness(ctx: Ctx) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the device-vs-CPU comparisons
    torch.backends.cudnn.allow_tf32 = False
    ctx.attempt("check_losses", lambda: check_losses(ctx))
    ctx.attempt("check_sampler", lambda: check_sampler(ctx))
    ctx.attempt("check_train_run", lambda: check_train_run(ctx))
    ctx.attempt("check_checkpoint", lambda: check_checkpoint(ctx))


def fixed_inputs(ctx: Ctx, z_dim: int, tokens: int, B: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    L = ctx.s.latent
    moments = torch.cat([torch.randn(B, 4, L, L, generator=g), 0.1 * torch.rand(B, 4, L, L, generator=g)], 1)
    return {"batch": {"moments": moments,
                      "label": torch.randint(1000, (B,), generator=g),
                      "feat.0": torch.randn(B, tokens, z_dim, generator=g)},
            "draws": {"posterior": torch.randn(B, 4, L, L, generator=g), "t": torch.rand(B, generator=g),
                      "noise": torch.randn(B, 4, L, L, generator=g), "drop": torch.zeros(B, dtype=torch.long)}}


def loss_parts(ctx: Ctx, model, inputs: dict, device, precision: str) -> list[float]:
    from repa.trainer.loss import REPALoss
    from repa.trainer.train import loss_from_latents
    mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    ac = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]) \
        if precision != "fp32" else contextlib.nullcontext()
    batch, d = mv(inputs["batch"]), mv(inputs["draws"])
    mean, std = batch["moments"].float().chunk(2, dim=1)
    x0 = (mean + std * d["posterior"]) * 0.18215
    with torch.no_grad(), ac:
        _, parts = loss_from_latents(model, REPALoss(), batch, x0, feats=["feat.0"], proj_coeff=0.5, t=d["t"],
                                     noise=d["noise"], drop=d["drop"])
    return parts.tolist()


def check_losses(ctx: Ctx) -> None:
    """Fixed weights, batch and draws: fp32 on the device vs on the CPU, and bf16/fp16 autocast vs fp32."""
    import copy
    dim, tokens = teacher_shape(ctx)
    cpu_model, _ = build_sit(ctx, ctx.s.check_model, z_dim=dim, device="cpu")
    perturb(cpu_model)
    cpu_model.train()
    dev_model = copy.deepcopy(cpu_model).to(ctx.device)
    inputs = fixed_inputs(ctx, dim, tokens)
    ref = loss_parts(ctx, cpu_model, inputs, torch.device("cpu"), "fp32")
    got = {p: loss_parts(ctx, dev_model, inputs, ctx.device, p) for p in ("fp32", "bf16", "fp16")}
    ctx.emit(check_losses_fp32_cpu=ref[:2], **{f"check_losses_{p}": v[:2] for p, v in got.items()})
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    check(ctx, "loss_fp32_device_vs_cpu_rel", rel(got["fp32"][0], ref[0]), TOL["loss_fp32_device_vs_cpu_rel"])
    for p in ("bf16", "fp16"):
        check(ctx, f"loss_{p}_vs_fp32_rel", rel(got[p][0], got["fp32"][0]), TOL[f"loss_{p}_vs_fp32_rel"])
        check(ctx, f"proj_{p}_vs_fp32_abs", abs(got[p][1] - got["fp32"][1]), TOL[f"proj_{p}_vs_fp32_abs"])


def check_sampler(ctx: Ctx) -> None:
    """The SDE with CFG + guidance interval from the same noise (per-sample generators): device vs CPU, fp32."""
    import copy
    from repa.sampler import euler_maruyama_sampler
    from repa.sampler.generate import STREAM_SDE, initial_noise, sample_generator
    dim, _ = teacher_shape(ctx)
    cpu_model, _ = build_sit(ctx, ctx.s.check_model, z_dim=dim, device="cpu", fused_attn=False)
    perturb(cpu_model, seed=2)
    cpu_model.eval()
    dev_model = copy.deepcopy(cpu_model).to(ctx.device)
    idx = list(range(4))
    z = initial_noise(idx, 0, (4, ctx.s.latent, ctx.s.latent))
    y = torch.tensor([1, 7, 42, 999])
    out = {}
    for name, model, dev in (("cpu", cpu_model, "cpu"), ("device", dev_model, ctx.device)):
        gens = [sample_generator(0, i, STREAM_SDE) for i in idx]
        out[name] = euler_maruyama_sampler(model, z.to(dev), y.to(dev), num_steps=8, noise_generators=gens,
                                           **SDE).cpu()
    diff = float((out["cpu"] - out["device"]).abs().max())
    ctx.emit(check_sampler_max_abs_x=float(out["cpu"].abs().max()))
    check(ctx, "sampler_device_vs_cpu_abs", diff, TOL["sampler_device_vs_cpu_abs"])


def write_train_shards(out: str, n: int, latent: int, tokens: int = 64, dim: int = 32) -> str:
    """n random records (moments, label, one bf16 teacher) with the manifest repa-preprocess writes."""
    from repa.shards.synthetic import write_synthetic_set
    side = int(tokens ** 0.5)
    meta = [{"name": "random", "id": None, "tokens": tokens, "dim": dim, "grid": [side, side], "codec": "bf16"}]
    return write_synthetic_set(out, n, latent=latent, teachers=((tokens, dim),), num_classes=10,
                               records_per_shard=32, teacher_meta=meta)


def check_train_run(ctx: Ctx) -> None:
    """20 steps of the real repa-train loop (accelerate, shards written in place) on the device: the loss
    falls (mean of the last 5 steps below the first 5) and stays finite; the final checkpoint exists."""
    from repa.trainer.metrics import read_jsonl
    from repa.trainer.train import TrainConfig, train
    name, overrides, enc = ctx.s.check_model
    with tempfile.TemporaryDirectory(prefix="repa-gpu-train-") as tmp:
        shards = write_train_shards(os.path.join(tmp, "shards"), 64, ctx.s.latent)
        res = train(TrainConfig(shards=shards, output_dir=tmp, exp_name="check", model=name,
                                model_kwargs=dict(overrides, projector_dim=64), encoder_depth=enc, batch_size=16,
                                max_train_steps=20, checkpointing_steps=20, learning_rate=1e-3,
                                mixed_precision="bf16" if ctx.cuda else "no", num_workers=0, sampling_steps=0,
                                progress=False))
        losses = [r["loss"] for r in read_jsonl(os.path.join(tmp, "check", "metrics.jsonl"))]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        ctx.emit(check_train_losses=[round(v, 4) for v in losses])
        ok = len(losses) == 20 and all(math.isfinite(v) for v in losses) and res["step"] == 20 and \
            os.path.isdir(res["checkpoint"] or "")
        ctx.conn.send(("check", {"train_20_steps_loss_decreases": {
            "ok": bool(ok and last < first), "value": last / first, "tol": "< 1 (mean last 5 / mean first 5)"}}))


def check_checkpoint(ctx: Ctx) -> None:
    """save_checkpoint -> load_checkpoint of a device model, EMA and AdamW state after 2 steps: bitwise."""
    from repa.trainer.checkpoint import load_checkpoint, save_checkpoint
    dim, tokens = teacher_shape(ctx)
    tr = Trainee(ctx, ctx.s.check_model, dim)
    step = make_step(ctx, tr, "bf16" if ctx.cuda else "fp32")
    b = cached_batches(ctx, 1, dim, tokens)[0]
    step(b), step(b)
    state = {"step": 2, "optimizer": tr.opt.state_dict()}
    with tempfile.TemporaryDirectory(prefix="repa-gpu-ckpt-") as tmp:
        path = save_checkpoint(tmp, 2, model_sd=tr.model.state_dict(), ema_sd=tr.ema.state_dict(),
                               train_state=state, config={"model": tr.cfg})
        back = load_checkpoint(path)
    pairs = [(tr.model.state_dict(), back["model"]), (tr.ema.state_dict(), back["ema"])]
    opt_state, opt_back = state["optimizer"]["state"], back["train_state"]["optimizer"]["state"]
    pairs += [(opt_state[k], opt_back[k]) for k in opt_state]
    bad = [k for a, b2 in pairs for k in a if not same_bits(a[k], b2.get(k))]
    n = sum(len(a) for a, _ in pairs)
    ctx.conn.send(("check", {"checkpoint_round_trip_bitwise": {"ok": not bad and n > 0, "value": len(bad),
                                                               "tol": f"0 of {n} tensors differ"}}))


def same_bits(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(as_bytes(a), as_bytes(b))


# ---------------------------------------------------------------- driver (parent: no CUDA work at all)

SECTIONS = {  # run in this order; the compile section last, as the slowest to start and the most optional
    "correctness": section_correctness,
    "train_xl2": lambda ctx: section_train(ctx, "xl2"),
    "train_b2": lambda ctx: section_train(ctx, "b2"),
    "haste": section_haste,
    "sampling": section_sampling,
    "preprocess": section_preprocess,
    "compile": section_compile,
}


def child_main(name: str, shapes: Shapes, device: str, deadline: float, conn, args) -> None:
    os.setpgrp()  # own process group: a timeout kill also takes its DataLoader workers
    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # the README recipe's --allow-tf32
        torch.backends.cudnn.allow_tf32 = True
        conn.send(("result", {"device_name": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                              "cuda": torch.version.cuda}))
    else:
        torch.set_num_threads(args.threads)
    ctx = Ctx(shapes, dev, deadline, conn, args, name)
    try:
        SECTIONS[name](ctx)
        conn.send(("done", {}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("fail", {"error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-3000:]}))
    finally:
        conn.close()


def run_section(name: str, shapes: Shapes, device: str, budget: float, args) -> dict:
    """Fork the section, collect what it sends until it finishes or its budget runs out (then kill it)."""
    import multiprocessing as mp
    ctx = mp.get_context(args.start_method)
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.monotonic()
    proc = ctx.Process(target=child_main, args=(name, shapes, device, t0 + budget, send, args), daemon=False)
    proc.start()
    send.close()
    rec = {"status": "running", "results": {}, "errors": {}, "checks": {}}
    while time.monotonic() < t0 + budget:
        if not recv.poll(min(t0 + budget - time.monotonic(), 1.0)):
            if proc.is_alive() or recv.poll(0):
                continue
            break
        try:
            kind, payload = recv.recv()
        except EOFError:  # the section exited and its end of the pipe closed
            break
        if kind == "result":
            rec["results"].update(payload)
        elif kind == "error":
            rec["errors"].update(payload)
        elif kind == "check":
            rec["checks"].update(payload)
        else:
            rec["status"] = "ok" if kind == "done" else "error"
            rec.update(payload)
    proc.join(max(0.0, min(10.0, t0 + budget - time.monotonic())))  # a finished section exits by itself
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if rec["status"] == "running":
            rec.update(status="timeout", error=f"killed at its {budget:.0f} s budget")
        proc.join(5)
    if rec["status"] == "running":
        rec.update(status="error", error=f"the section process died (exit code {proc.exitcode})")
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summarize(r: dict, checks: dict, sections: dict, shapes: Shapes, device_name: str) -> dict:
    """The headline keys (BENCHMARKS.md "GPU") from the raw per-section results."""
    g = r.get
    out = {
        "device": device_name, "quick": shapes.quick, "batch_per_gpu": shapes.batch, "res": shapes.res,
        "xl2_img_s": g("xl2_ours_fp16_img_s"),
        "xl2_bf16_img_s": g("xl2_ours_bf16_img_s"),
        "xl2_vs_reference": ratio(g("xl2_ours_fp16_img_s"), g("xl2_reference_img_s")),
        "xl2_bf16_vs_reference": ratio(g("xl2_ours_bf16_img_s"), g("xl2_reference_img_s")),
        "xl2_vs_reference_cached_moments": ratio(g("xl2_ours_fp16_img_s"), g("xl2_reference_cached_moments_img_s")),
        "b2_img_s": g("b2_ours_fp16_img_s"),
        "b2_bf16_img_s": g("b2_ours_bf16_img_s"),
        "b2_vs_reference": ratio(g("b2_ours_fp16_img_s"), g("b2_reference_img_s")),
        "b2_vs_reference_cached_moments": ratio(g("b2_ours_fp16_img_s"), g("b2_reference_cached_moments_img_s")),
        "compile_speedup": ratio(g("compile_compiled_img_s"), g("compile_eager_img_s")),
        "peak_mem_gib": g("xl2_ours_fp16_peak_gib"),
        "peak_mem_kind": "cuda max_memory_allocated" if not shapes.quick else "process peak RSS (CPU)",
        "haste_phase1_vs_repa": ratio(g("haste_phase1_step_ms"), g("haste_repa_step_ms")),
        "haste_after_stop_vs_repa": ratio(g("haste_after_stop_step_ms"), g("haste_repa_step_ms")),
        "preprocess_img_s": g("pre_end_to_end_img_s"),
        "preprocess_of_model_only": ratio(g("pre_end_to_end_img_s"), g("pre_model_only_img_s")),
    }
    for B in shapes.sample_batches:
        out[f"sample_img_s_b{B}"] = g(f"sample_b{B}_ours_img_s")
        out[f"sample_vs_reference_b{B}"] = ratio(g(f"sample_b{B}_ours_img_s"), g(f"sample_b{B}_reference_img_s"))
    first = shapes.sample_batches[0]
    out["sample_fused_attn_speedup"] = ratio(g("sample_fused_attn_img_s"), g(f"sample_b{first}_ours_img_s"))
    corr = sections.get("correctness", {})
    out["correctness_passed"] = bool(corr.get("status") == "ok" and not corr.get("errors")
                                     and all(n in checks for n in EXPECTED_CHECKS)
                                     and all(c["ok"] for c in checks.values()))
    out["checks"] = checks
    out["sections"] = {k: {kk: v[kk] for kk in ("status", "seconds", "error") if kk in v} for k, v in sections.items()}
    out["errors"] = {k: v for s in sections.values() for k, v in s.get("errors", {}).items()
                     if not k.endswith("_traceback")}
    out["raw"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes, tiny step counts (the test)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 300; --quick 240)")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                                                            "--quick: eager, to stay within its time)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (--quick; 1 is fastest for tiny models on a busy machine)")
    ap.add_argument("--json-out", default=None, help="also write the JSON there")
    ap.add_argument("--section-budget", default="", help="per-section seconds, e.g. compile=90,sampling=40")
    ap.add_argument("--tol-scale", type=float, default=1.0, help="multiply every numeric tolerance (0: any "
                                                                 "difference fails)")
    ap.add_argument("--start-method", choices=["fork", "spawn"], default=None,
                    help="how sections start: spawn on CUDA (a fresh interpreter, no CUDA state inherited), fork "
                         "on CPU (the imports are shared, faster)")
    ap.add_argument("--hang", default=None, help=argparse.SUPPRESS)  # tests: this section hangs
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    shapes = quick_shapes() if args.quick else full_shapes()
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    device = args.device or ("cpu" if args.quick else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine, or pass --quick for the CPU "
              "smoke run", file=sys.stderr)
        return 2
    args.start_method = args.start_method or ("spawn" if device.startswith("cuda") else "fork")
    budget = args.budget or (240.0 if args.quick else 300.0)
    names = args.only.split(",") if args.only else list(SECTIONS)
    for item in filter(None, args.section_budget.split(",")):
        key, _, sec = item.partition("=")
        if key not in SECTIONS or not sec.replace(".", "", 1).isdigit():
            ap.error(f"--section-budget {item!r}: expected NAME=SECONDS with NAME one of {list(SECTIONS)}")
        shapes.budgets[key] = float(sec)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.start_method == "fork":  # imported once here, shared by every forked section
        import diffusers, timm  # noqa: F401,E401
        import repa.preprocess.pipeline, repa.sampler, repa.trainer.train  # noqa: F401,E401
    results, checks, sections = {}, {}, {}
    for name in names:
        left = budget - (time.monotonic() - t_start) - 3
        own = min(shapes.budgets[name], left)
        if own < min(8.0, shapes.budgets[name]):
            sections[name] = {"status": "skipped", "error": f"{left:.0f} s left of the {budget:.0f} s budget"}
            continue
        rec = run_section(name, shapes, device, own, args)
        sections[name] = rec
        results.update(rec["results"])
        checks.update(rec["checks"])
        print(f"[{name}] {rec['status']} in {rec['seconds']} s" + (f": {rec['error']}" if rec.get("error") else ""),
              flush=True)
        for k, v in rec["errors"].items():
            print(f"    {k}: {v}", flush=True)
    device_name = results.get("device_name") or (f"cpu ({os.cpu_count()} cores)" if device == "cpu" else device)
    out = summarize(results, checks, sections, shapes, device_name)
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    print_table(out)
    line = json.dumps(out, default=str)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if out["correctness_passed"] or "correctness" not in names else 1


def print_table(out: dict) -> None:
    for name, c in out["checks"].items():
        print(f"  check {name:36s} {'ok  ' if c['ok'] else 'FAIL'} value {c['value']} (tolerance {c['tol']})")
    for k, v in out.items():
        if k not in ("checks", "sections", "raw", "errors") and v is not None:
            print(f"  {k:36s} {v}")


if __name__ == "__main__":
    sys.exit(main())
