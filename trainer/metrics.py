"""Observability for repa-train: the JSONL metrics file, tracker set-up and EMA preview grids."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from PIL import Image

from repa.preprocess.vae import load_vae
from repa.shards import storage

TRACKERS = ("none", "tensorboard", "wandb")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: str) -> str | None:
    """Validate ``--report-to``; returns accelerate's ``log_with`` (None for "none")."""
    if report_to not in TRACKERS:
        raise ValueError(f"--report-to must be one of {TRACKERS}, got {report_to!r}")
    if report_to == "none":
        return None
    if importlib.util.find_spec(TRACKER_PACKAGES[report_to]) is None:
        raise ValueError(f"--report-to {report_to} needs the {TRACKER_PACKAGES[report_to]!r} package: "
                         f"pip install {TRACKER_PACKAGES[report_to]} (or use --report-to none; "
                         f"metrics.jsonl is always written)")
    return report_to


class JsonlWriter:
    """Appends one JSON object per line to ``path`` (main process only), flushed every line."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        """Floats stay numbers; nan/inf become the strings "nan"/"inf" (strict JSON has no NaN)."""
        clean = {}
        for k, v in record.items():
            if isinstance(v, (float, np.floating)):
                v = float(v) if math.isfinite(v) else str(float(v))
            clean[k] = v
        self.file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- EMA preview grid

@torch.no_grad()
def euler_preview(model, noise: torch.Tensor, labels: torch.Tensor, num_steps: int = 50,
                  cfg_scale: float = 4.0) -> torch.Tensor:
    """Euler ODE from t=1 (noise) to t=0 (docs/reference.md §6.2) with CFG on all channels.

    Its own few lines rather than repa.sampler's solver: the trainer sits below the sampler in the package
    order (shards -> trainer -> sampler), and a preview only needs to show where the EMA is going.
    """
    x = noise.double()
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    null = torch.full_like(labels, model.num_classes)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        xin = torch.cat([x, x]).float() if cfg_scale > 1 else x.float()
        yin = torch.cat([labels, null]) if cfg_scale > 1 else labels
        tin = torch.full((xin.shape[0],), float(t_cur), device=x.device)
        v = model(xin, tin, yin)[0].double()
        if cfg_scale > 1:
            cond, uncond = v.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        x = x + (t_next - t_cur) * v
    return x.float()


def to_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 HWC grid image."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.zeros(3, ncol * h, nrow * w)
    for i, img in enumerate(images.float().cpu()):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_png(path: str, image: np.ndarray) -> None:
    """Save a uint8 (H, W, 3) array as PNG atomically (temp + fsync + rename, umask mode): a crash never leaves
    a truncated PNG under its name. The one PNG writer of the trainer and the sampler."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.atomic_write(path, buf.getvalue())


class PreviewDecoder:
    """Latents -> images in [-1, 1] for the preview grid, following the manifest's VAE.

    ``vae.id`` null means pixel space: the latent *is* the image. A VAE that cannot be loaded (offline,
    not downloaded) gives one warning and the grid falls back to the first 3 latent channels.
    """

    def __init__(self, provenance: dict, device):
        vae = provenance.get("vae") or {}
        c = int(vae.get("latent_channels", 4))
        self.scale = torch.tensor(vae.get("scale", [1.0] * c), dtype=torch.float32).view(1, -1, 1, 1)
        self.bias = torch.tensor(vae.get("bias", [0.0] * c), dtype=torch.float32).view(1, -1, 1, 1)
        self.vae_id = vae.get("id")
        self.device = device
        self._vae = None
        self._failed = self.vae_id is None

    def _load(self):
        if self._vae is None and not self._failed:
            try:
                self._vae = load_vae(self.vae_id, self.device)
            except Exception as e:  # noqa: BLE001 - a preview must never kill a training run
                warnings.warn(f"preview grids: cannot load VAE {self.vae_id!r} ({type(e).__name__}: {e}); "
                              f"saving the first 3 latent channels instead. Download the VAE (or set "
                              f"HF_HOME to a cache holding it) to get decoded previews.")
                self._failed = True
        return self._vae

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = (z.float().cpu() - self.bias) / self.scale  # undo the training-time scale/bias
        if self.vae_id is None:
            return z[:, :3]
        vae = self._load()
        if vae is None:
            z = z[:, :3]
            lo = z.amin(dim=(1, 2, 3), keepdim=True)
            hi = z.amax(dim=(1, 2, 3), keepdim=True)
            return (z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
        return vae.decode(z.to(self.device)).float().cpu()


# ---------------------------------------------------------------- a run's per-step outputs

class Preview:
    """EMA sample grid with fixed noise/labels (own generator: never touches the training RNG)."""

    def __init__(self, cfg, model_kwargs, prov, device):
        g = torch.Generator().manual_seed(cfg.seed)
        c, s = model_kwargs["in_channels"], model_kwargs["input_size"]
        self.noise = torch.randn(cfg.num_preview, c, s, s, generator=g).to(device)
        self.labels = torch.randint(model_kwargs["num_classes"], (cfg.num_preview,), generator=g).to(device)
        vae = {**(prov.get("vae") or {}), **({"id": cfg.preview_vae} if cfg.preview_vae else {})}
        self.decode = PreviewDecoder({**prov, "vae": vae}, device)
        # a model trained without label dropout (--cfg-prob 0) has no null class to guide with
        self.steps = cfg.preview_steps
        self.cfg_scale = cfg.preview_cfg if model_kwargs.get("class_dropout_prob", 0.1) > 0 else 1.0

    def __call__(self, ema, path):
        z = euler_preview(ema, self.noise, self.labels, self.steps, self.cfg_scale)
        save_png(path, to_grid(self.decode(z)))


class RunLog:
    """What a step leaves behind on rank 0: a metrics.jsonl line, tracker scalars, the tqdm bar, a warning when
    the skipped-record count grows, and every ``--sampling-steps`` an EMA preview grid. Other ranks: nothing."""

    def __init__(self, cfg, exp_dir: str, accelerator, log_with, project: str, log, start_step: int,
                 preview_factory, stack):
        from tqdm.auto import tqdm
        self.cfg, self.exp_dir, self.accelerator, self.log_with, self.log = cfg, exp_dir, accelerator, log_with, log
        main = accelerator.is_main_process
        self.metrics = JsonlWriter(os.path.join(exp_dir, "metrics.jsonl")) if main else None
        if self.metrics is not None:
            stack.callback(self.metrics.close)
        if log_with:
            accelerator.init_trackers(project, config=_flat(cfg.to_json()))
            stack.callback(accelerator.end_training)
        self.preview = preview_factory() if main and cfg.sampling_steps else None
        self.bar = stack.enter_context(tqdm(total=cfg.max_train_steps, initial=start_step, dynamic_ncols=True,
                                            desc="train", disable=not (main and cfg.progress)))
        self.skipped = 0

    def step(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write({**record, "time": time.time()})
        if self.log_with:
            self.accelerator.log(record, step=record["step"])
        if record["skipped_records"] > self.skipped:
            self.skipped = record["skipped_records"]
            self.log.warning(f"step {record['step']}: skipped {self.skipped} bad record(s) so far (--skip-bad); "
                             f"re-create the damaged shards with repa-preprocess")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", proj=f"{record['proj_loss']:.4f}",
                             gnorm=f"{record['grad_norm']:.3f}", samples_s=f"{record['samples_per_s']:.1f}",
                             refresh=False)
        self.bar.update(1)

    def maybe_preview(self, ema, step: int) -> None:
        if self.preview is not None and step % self.cfg.sampling_steps == 0:
            self.preview(ema, os.path.join(self.exp_dir, "samples", f"{step:07d}.png"))


def _flat(d: dict) -> dict:
    """Tracker configs accept scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in d.items()}
