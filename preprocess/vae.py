"""The frozen image autoencoder: load it, encode images to posterior moments, decode latents.

``load_vae(spec)`` accepts

* ``ema`` (default, ``stabilityai/sd-vae-ft-ema``) or ``mse`` (``stabilityai/sd-vae-ft-mse``),
* any Hugging Face repo id holding a diffusers ``AutoencoderKL`` (``owner/name``, or
  ``owner/name/vae`` for a pipeline repo's subfolder),
* a local diffusers directory (``AutoencoderKL.save_pretrained`` output, or a pipeline folder with ``vae/``),
* ``none``: pixel space, the "latent" is the image itself.

Moments follow docs/reference.md §5.2/5.3: ``cat([posterior.mean, posterior.std], dim=1)`` in float32, where
diffusers' ``DiagonalGaussianDistribution`` clamps logvar to [-30, 20] and std = exp(0.5 * logvar). For
``none`` the moments are ``cat([x, zeros])``.

Latent scaling convention (``provenance["scale"]``, ``provenance["bias"]``, one value per channel): the
trainer uses ``z_scaled = z * scale + bias`` and decodes ``decode((z_scaled - bias) / scale)``. SD-VAEs
have scale 0.18215 and bias 0. A config ``shift_factor`` s gives bias = -s * scale; per-channel
``latents_mean``/``latents_std`` give scale_c = scaling_factor / std_c and bias_c = -mean_c * scale_c.

Posterior sampling belongs to the trainer; this module only loads, encodes and decodes.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .hub import download_guard

__all__ = ["load_vae", "DiffusersVAE", "PixelSpace", "VAE_ALIASES"]

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
_LOCAL_HINT = ("--vae /path/to/dir (a diffusers AutoencoderKL folder with config.json and "
               "diffusion_pytorch_model.safetensors, as save_pretrained writes it)")


def _check_images(x: torch.Tensor, channels: int, multiple: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{who}: expected images (B, {channels}, H, W) in [-1, 1], got {tuple(x.shape)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"{who}: image size {tuple(x.shape[-2:])} is not a multiple of the VAE's "
                         f"downsampling factor {multiple}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected float images in [-1, 1] (x / 127.5 - 1), got {x.dtype}")


class PixelSpace(nn.Module):
    """``--vae none``: the latent is the image in [-1, 1]; moments are [x, 0]."""

    latent_channels = 3
    downsample = 1

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, 3, 1, "vae none")
        x = x.to(self.device, torch.float32)
        return torch.cat([x, torch.zeros_like(x)], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.device, torch.float32)

    @property
    def provenance(self) -> dict:
        return {"id": None, "latent_channels": 3, "downsample": 1, "scale": [1.0] * 3, "bias": [0.0] * 3}


class DiffusersVAE(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with the REPA moment layout and scaling convention."""

    def __init__(self, vae: nn.Module, model_id: str):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.model_id = model_id
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        sf = float(getattr(cfg, "scaling_factor", None) or 0.18215)
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        c = self.latent_channels
        if mean is not None and std is not None:
            self.scale = [sf / float(s) for s in std]
            self.bias = [-float(m) * k for m, k in zip(mean, self.scale)]
        else:
            self.scale = [sf] * c
            self.bias = [-shift * sf + 0.0] * c
        if len(self.scale) != c:
            raise ValueError(f"VAE {model_id}: latents_mean/std have {len(self.scale)} entries for {c} channels")

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B,3,R,R) -> float32 (B, 2C, R/f, R/f) = cat([mean, std])."""
        _check_images(x, 3, self.downsample, f"vae {self.model_id}")
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ((z_scaled - bias) / scale), (B,C,h,w) -> images in [-1, 1], float32."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"vae {self.model_id}: expected latents (B, {self.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float()

    @property
    def provenance(self) -> dict:
        return {"id": self.model_id, "latent_channels": self.latent_channels, "downsample": self.downsample,
                "scale": list(self.scale), "bias": list(self.bias)}


def _local_vae_dir(path: str) -> tuple[str, str | None]:
    """(directory, subfolder) of a local AutoencoderKL: the folder itself or a pipeline's ``vae/``."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        return path, "vae"
    raise FileNotFoundError(f"--vae {path}: no config.json in this directory (nor in {path}/vae); expected "
                            f"an AutoencoderKL saved with save_pretrained")


def load_vae(spec: str = "ema", device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> DiffusersVAE | PixelSpace:
    """Load the frozen autoencoder named by ``--vae`` (see the module docstring)."""
    spec = (spec or "ema").strip()
    if spec.lower() == "none":
        return PixelSpace(device, dtype)
    from diffusers import AutoencoderKL
    repo = VAE_ALIASES.get(spec.lower(), spec)
    if os.path.isdir(repo):
        path, sub = _local_vae_dir(repo)
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        model_id = os.path.abspath(repo)
    elif os.path.sep in repo and repo.startswith((".", "/", "~")) or os.path.exists(repo):
        raise FileNotFoundError(f"--vae {spec}: no such directory; give a diffusers AutoencoderKL folder, "
                                f"an HF repo id, or one of ema, mse, none")
    else:
        parts = repo.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--vae {spec}: expected ema, mse, none, an HF repo id (owner/name, or "
                             f"owner/name/subfolder such as a pipeline's vae) or a local directory")
        sub = parts[2] if len(parts) == 3 else None
        with download_guard(repo, _LOCAL_HINT):
            vae = AutoencoderKL.from_pretrained("/".join(parts[:2]), subfolder=sub, torch_dtype=dtype)
        model_id = repo
    return DiffusersVAE(vae.to(device), model_id)
