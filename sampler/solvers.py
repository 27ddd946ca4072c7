"""Reference-exact ODE / SDE samplers for SiT flow models (docs/reference.md §6.1-6.3).

These follow REPA's ``samplers.py`` step for step, so scripts written for the reference port unchanged and,
for the same model, initial noise and RNG state, produce the same outputs:

* time runs from t = 1 (noise) to t = 0 (data); the state is carried in float64; the model is called with
  ``x`` and ``t`` cast to ``latents.dtype`` and its output recast to float64;
* classifier-free guidance is active at a step iff ``cfg_scale > 1`` and
  ``guidance_low <= t_cur <= guidance_high`` (inclusive, on the float64 time); the batch is doubled as
  ``[x, x]`` with labels ``[y, y_null]`` and combined as ``uncond + s * (cond - uncond)`` on all channels.

Two deliberate, documented extensions (both keyword-only, defaults keep the reference behaviour):

* ``null_class``: the reference hard-codes ``y_null = 1000``, which is wrong for ``num_classes != 1000``.
  We use ``null_class`` if given, else the model's own null class (``model.y_embedder.num_classes`` or
  ``model.num_classes``), else 1000. For every ImageNet model this is 1000, i.e. the reference's value.
* ``noise_generators`` (SDE only): one ``torch.Generator`` per sample. Without it the SDE noise is
  ``torch.randn_like(x)`` (float64, on x's device), exactly the reference's global-RNG stream. With it,
  sample b's noise at every step is drawn from ``noise_generators[b]`` (float64, on the generator's device),
  so a sample's trajectory does not depend on which other samples share its batch.

The model may return a tuple/list ``(v, zs, ...)`` (SiT) or a bare tensor; the velocity is the first item.
"""
from __future__ import annotations

from typing import Sequence

import torch

from repa.trainer.loss import interpolant  # the one definition of the paths (training uses it too)

__all__ = ["euler_sampler", "euler_maruyama_sampler", "get_score_from_velocity", "resolve_null_class"]

REFERENCE_NULL_CLASS = 1000


def _unwrap(model):
    """The SiT inside DDP / accelerate wrappers and torch.compile."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def resolve_null_class(model, null_class: int | None = None) -> int:
    """The label index meaning "unconditional": ``null_class``, else the model's ``num_classes``, else 1000."""
    if null_class is not None:
        return int(null_class)
    inner = _unwrap(model)
    for owner in (getattr(inner, "y_embedder", None), inner):
        n = getattr(owner, "num_classes", None)
        if isinstance(n, int):
            return n
    return REFERENCE_NULL_CLASS


def _expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


def get_score_from_velocity(vt: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, path_type: str = "linear"):
    """Score s = ((alpha/alpha') v - x) / var with var = sigma^2 - (alpha/alpha') sigma' sigma (docs/reference.md §6.3).

    For the linear path this is ((t - 1) v - x) / t. Operation order follows the reference.
    """
    if path_type not in ("linear", "cosine"):
        raise ValueError(f"path_type must be 'linear' or 'cosine', got {path_type!r}")
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(_expand_t_like_x(t, xt), path_type)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * vt - xt) / var


class _Guided:
    """Calls the model on x (float64) at time t, doubling the batch for CFG, and returns float64 outputs.

    ``post`` (optional) maps (v, model_input, time_input) -> the quantity that CFG combines (the SDE's drift).
    """

    def __init__(self, model, y: torch.Tensor, cfg_scale: float, guidance_low: float, guidance_high: float,
                 dtype: torch.dtype, null_class: int):
        self.model, self.y, self.dtype = model, y, dtype
        self.cfg_scale, self.low, self.high = cfg_scale, guidance_low, guidance_high
        self.y_cfg = None
        if cfg_scale > 1.0:
            table = getattr(getattr(_unwrap(model), "y_embedder", None), "embedding_table", None)
            if table is not None and null_class >= table.num_embeddings:
                raise ValueError(f"cfg_scale={cfg_scale} needs a null-class embedding (row {null_class}), but the "
                                 f"model's label table has {table.num_embeddings} rows: it was trained without "
                                 "label dropout (class_dropout_prob / --cfg-prob 0). Sample with cfg_scale 1")
            self.y_cfg = torch.cat([y, torch.full_like(y, null_class)], dim=0)

    def active(self, t_cur: torch.Tensor) -> bool:
        return bool(self.cfg_scale > 1.0 and t_cur <= self.high and t_cur >= self.low)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cfg: bool, post=None) -> torch.Tensor:
        model_input = torch.cat([x, x], dim=0) if cfg else x
        y_cur = self.y_cfg if cfg else self.y
        time_input = torch.ones(model_input.size(0), device=x.device, dtype=torch.float64) * t
        out = self.model(model_input.to(dtype=self.dtype), time_input.to(dtype=self.dtype), y=y_cur)
        if isinstance(out, (tuple, list)):
            out = out[0]
        d = out.to(torch.float64)
        if post is not None:
            d = post(d, model_input, time_input)
        if cfg:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + self.cfg_scale * (d_cond - d_uncond)
        return d


@torch.no_grad()
def euler_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20, heun: bool = False,
                  cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                  path_type: str = "linear", *, null_class: int | None = None) -> torch.Tensor:
    """Euler (optionally Heun) ODE sampler, docs/reference.md §6.2. Returns the float64 sample at t = 0.

    Grid t = linspace(1, 0, num_steps + 1). Heun corrects every step but the last (NFE = 2N - 1) and reuses the
    CFG on/off decision of t_cur for its second evaluation at t_next. ``path_type`` is accepted and ignored, as in
    the reference (the velocity ODE does not depend on it).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    call = _Guided(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype,
                   resolve_null_class(model, null_class))
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        cfg = call.active(t_cur)
        d_cur = call(x_cur, t_cur, cfg)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = call(x_next, t_next, cfg)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _sde_noise(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """float64 standard normal noise shaped like x: the global stream, or one row per per-sample generator."""
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.size(0):
        raise ValueError(f"noise_generators has {len(generators)} generators for a batch of {x.size(0)}")
    rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float64, device=g.device) for g in generators]
    return torch.stack(rows).to(x.device)


@torch.no_grad()
def euler_maruyama_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20,
                           heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                           guidance_high: float = 1.0, path_type: str = "linear", *,
                           null_class: int | None = None,
                           noise_generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Euler-Maruyama SDE sampler, docs/reference.md §6.3. Returns the float64 mean at t = 0.

    Grid linspace(1, 0.04, num_steps) + [0]. For the first num_steps - 1 intervals: w = 2 t_cur, noise drawn
    before the model call, drift d = v - w/2 * score(v) (CFG applied to d), x += d dt + sqrt(w) sqrt(|dt|) eps.
    The last interval (0.04 -> 0) is a noise-free Euler step on the drift. ``heun`` is ignored (as the reference).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if path_type not in ("linear", "cosine"):
        raise ValueError(f"path_type must be 'linear' or 'cosine', got {path_type!r}")
    call = _Guided(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype,
                   resolve_null_class(model, null_class))
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])

    def drift_post(t_cur):
        diffusion = 2 * t_cur

        def post(v, model_input, time_input):
            s = get_score_from_velocity(v, model_input, time_input, path_type=path_type)
            return v - 0.5 * diffusion * s
        return post

    x_next = latents.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur = x_next
        diffusion = 2 * t_cur
        deps = _sde_noise(x_cur, noise_generators) * torch.sqrt(torch.abs(dt))
        d_cur = call(x_cur, t_cur, call.active(t_cur), post=drift_post(t_cur))
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    dt = t_next - t_cur
    d_cur = call(x_next, t_cur, call.active(t_cur), post=drift_post(t_cur))
    return x_next + dt * d_cur
