"""The REPA objective: stochastic-interpolant denoising loss (v-prediction) + projection alignment loss.

Exactly REPA's ``loss.py`` (class ``SILoss``, docs/reference.md section 2), with two fixes that do not change the
values: the projection loss averages over tokens explicitly (the reference relies on ``torch.mean(dim=[])``
fully reducing a vector), and teacher tokens on a different grid are resampled onto the student's
(``trainer.models.resample_tokens``) instead of crashing.

Random draws happen in the reference order (docs/reference.md §3.3): t on the CPU generator (``torch.rand`` for
uniform, ``torch.randn`` for lognormal), then the noise ε with ``randn_like`` on the latents' device,
then the label dropout inside the model. ``t`` and ``noise`` can be passed explicitly for determinism.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from repa.trainer.models import resample_tokens

__all__ = ["PATH_TYPES", "WEIGHTINGS", "interpolant", "sample_time", "projection_loss", "REPALoss", "SILoss"]

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


def _check(path_type: str, weighting: str | None = None, prediction: str = "v") -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path_type {path_type!r}: choose one of {PATH_TYPES}")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: choose one of {WEIGHTINGS}")
    if prediction != "v":
        raise ValueError(f"prediction={prediction!r} is not supported: only 'v' (velocity) prediction is "
                         "implemented, as in the reference")


def interpolant(t: torch.Tensor, path_type: str = "linear"):
    """(alpha_t, sigma_t, d alpha/dt, d sigma/dt) for x_t = alpha_t·x0 + sigma_t·eps (docs/reference.md §2.1).

    linear: alpha = 1-t, sigma = t.  cosine: alpha = cos(pi t/2), sigma = sin(pi t/2).
    t = 0 is data, t = 1 is noise. Outputs have t's shape and dtype.
    """
    _check(path_type)
    if path_type == "linear":
        return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)
    half_pi = math.pi / 2
    return (torch.cos(t * half_pi), torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi), half_pi * torch.cos(t * half_pi))


def sample_time(batch_size: int, weighting: str = "uniform", path_type: str = "linear",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times, shape (B, 1, 1, 1) float32 on the CPU (docs/reference.md §2.2).

    uniform: t ~ U[0, 1) via ``torch.rand``. lognormal: n ~ N(0, 1) via ``torch.randn``, s = exp(n);
    linear path t = s/(1+s) (= sigmoid(n)), cosine path t = (2/pi)·atan(s).
    ``generator`` is a CPU generator; None uses torch's default CPU generator, as the reference does.
    """
    _check(path_type, weighting)
    shape = (batch_size, 1, 1, 1)
    if weighting == "uniform":
        return torch.rand(shape, generator=generator)
    s = torch.randn(shape, generator=generator).exp()
    if path_type == "linear":
        return s / (1 + s)
    return 2 / math.pi * torch.atan(s)


def projection_loss(zs, zs_tilde) -> torch.Tensor:
    """REPA alignment loss (docs/reference.md §2.4): mean over encoders, batch and tokens of -cos(z*, z~).

    zs: list over encoders of teacher tokens (B, T, z); zs_tilde: the projector outputs, same shapes.
    Each token is L2-normalised (eps 1e-12); per sample the negative cosine is averaged over its T tokens,
    then summed over samples and encoders and divided by (N_enc·B). Computed in float32.
    """
    if len(zs) != len(zs_tilde):
        raise ValueError(f"{len(zs)} teacher feature sets but {len(zs_tilde)} projectors")
    if len(zs) == 0:
        raise ValueError("projection_loss needs at least one teacher")
    batch = zs[0].shape[0]
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        if z.shape != z_tilde.shape:
            raise ValueError(f"teacher features {tuple(z.shape)} vs projector output {tuple(z_tilde.shape)}")
        z = F.normalize(z.float(), dim=-1, eps=1e-12)
        z_tilde = F.normalize(z_tilde.float(), dim=-1, eps=1e-12)
        per_sample = (-(z * z_tilde).sum(dim=-1)).mean(dim=-1)  # (B,): mean over tokens
        total = total + per_sample.sum()
    return total / (len(zs) * batch)


class REPALoss:
    """REPA's ``SILoss``: returns (denoising loss per sample (B,), projection loss scalar).

    Usage::
        loss_fn = REPALoss(path_type="linear", weighting="uniform")
        denoise, proj = loss_fn(model, x0, labels, zs=teacher_feats)
        loss = denoise.mean() + proj_coeff * proj
        denoise, proj, attn_logits = loss_fn(model, x0, labels, zs, return_attn=True)   # HASTE

    x0 is the scaled clean latent (B, C, H', W'); zs a list of teacher tokens (B, T_t, z) (or None: the
    projection loss is then 0 and not computed, e.g. after HASTE's early stop). Teacher tokens whose count
    differs from the student's are resampled onto the student grid with ``resample_tokens``.
    """

    def __init__(self, prediction: str = "v", path_type: str = "linear", weighting: str = "uniform"):
        _check(path_type, weighting, prediction)
        self.prediction = prediction
        self.path_type = path_type
        self.weighting = weighting

    def interpolant(self, t):
        return interpolant(t, self.path_type)

    def __call__(self, model, x0, labels, zs=None, *, t=None, noise=None, generator=None,
                 return_attn: bool = False, force_drop_ids=None):
        """One loss evaluation. ``t`` (B,1,1,1) or (B,) and ``noise`` (like x0) override the random draws;
        ``generator`` is the CPU generator for t. Returns (denoising (B,), proj scalar[, attn_logits])."""
        B = x0.shape[0]
        if t is None:
            t = sample_time(B, self.weighting, self.path_type, generator)
        t = t.reshape(B, 1, 1, 1).to(device=x0.device, dtype=x0.dtype)
        if noise is None:
            noise = torch.randn_like(x0)
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = self.interpolant(t)
        x_t = alpha_t * x0 + sigma_t * noise
        target = d_alpha_t * x0 + d_sigma_t * noise

        extra = {}  # only pass what is used, so any (v, zs) model with the reference signature works
        if return_attn:
            extra["return_attn"] = True
        if force_drop_ids is not None:
            extra["force_drop_ids"] = force_drop_ids
        out = model(x_t, t.flatten(), y=labels, **extra)
        v_pred, zs_tilde = out[0], out[1]
        denoising = ((v_pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))

        if zs:
            zs = [resample_tokens(z, _square_side(zt.shape[1])) if z.shape[1] != zt.shape[1] else z
                  for z, zt in zip(zs, zs_tilde)]
            proj = projection_loss(zs, zs_tilde)
        else:
            proj = torch.zeros((), device=x0.device)
        if return_attn:
            return denoising, proj, out[2]
        return denoising, proj


def _square_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"student has {num_tokens} tokens, not a square grid")
    return side


SILoss = REPALoss  # the reference's name
