"""Exponential moving average of the model weights (docs/reference.md §3.4)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` in eval mode (call before wrapping the model in DDP)."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema_p <- decay * ema_p + (1 - decay) * p over ALL named parameters (frozen pos_embed included).

    Same arithmetic as the reference (``mul_(decay).add_(p, alpha=1 - decay)``), batched with
    ``torch._foreach_*``. ``model`` must be the unwrapped module (no ``module.`` prefix).
    """
    ema_params = dict(ema.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    if names != list(ema_params):
        raise ValueError("EMA and model parameter names differ; build the EMA with make_ema(model)")
    dst = list(ema_params.values())
    src = [p.detach().float() for p in model.parameters()]
    torch._foreach_mul_(dst, decay)
    torch._foreach_add_(dst, src, alpha=1 - decay)
