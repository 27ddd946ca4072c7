"""MMDiT (SD3-style joint-attention DiT) with a REPA projector: the text-to-image model of REPA's
``train_t2i.py`` (MS-COCO 256, paper Table 12), written from scratch to be state-dict compatible with the
official ``models/mmdit.py``.

Architecture (official layout, every name below is a state-dict key prefix):
  * ``x_embedder.proj``: Conv2d patchifier; ``pos_embed``: fixed 2-D sin-cos table (a buffer, saved).
  * ``t_embedder.mlp``: sinusoidal timestep MLP; optional ``y_embedder.mlp`` (pooled vector, ``adm_in_channels``).
  * ``context_embedder``: Linear(context_dim = 768 for CLIP ViT-L/14 hidden states, hidden).
  * optional ``register``: learned tokens prepended to the context.
  * ``joint_blocks.<i>.{context_block, x_block}``: two adaLN-modulated streams whose q/k/v are concatenated
    (context first) for one joint attention. The context stream of the LAST block is "pre-only": it only
    contributes keys/values (2 modulation vectors, no out-projection, no MLP).
  * ``final_layer``: adaLN + LayerNorm + Linear on the image stream; ``projectors.<k>``: REPA MLPs applied to
    the image stream after block ``encoder_depth`` (1-indexed).

Sizing, as in the official code: hidden = 32·depth and heads = depth (head_dim 32). The official recipe is
``MMDiT(input_size=32, z_dims=[768], encoder_depth=8)``: depth 24, hidden 768, 24 heads, patch 2, qkv bias,
LayerNorm, GELU-tanh MLP, no qk-norm (its ``--qk-norm`` flag is parsed but never used). Our names pick the
depth so the width matches the SiT of the same letter: S = depth 12 (384), B = depth 24 (768, the official
recipe), L = depth 32 (1024), XL = depth 36 (1152).

Initialisation is the official one, i.e. PyTorch's defaults (the official MMDiT has no adaLN-zero init);
modules are built in the official order, so the same seed gives the same weights. Deliberate differences:
  * learnable RMSNorm weights (``qk_norm="rms"``) start at 1; the official ``torch.empty`` leaves them
    uninitialised memory;
  * the official crops a 16x16 ``pos_embed`` (``pos_embed_max_size`` is hard-coded), so it only runs with a
    16x16 token grid; ours builds the table for ``input_size // patch_size`` (identical at 16x16) and any
    other latent size is a clear error;
  * ``encoder_depth`` outside [1, depth] and a missing ``context`` raise instead of crashing later.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from repa.shards import ShardStream
from repa.shards import records as R
from repa.shards import storage
from repa.trainer.metrics import PreviewDecoder, save_png, to_grid
from repa.trainer.models import Mlp, TimestepEmbedder, build_mlp, get_2d_sincos_pos_embed

__all__ = ["MMDiT", "MMDIT_ARCHS", "mmdit_config", "build_mmdit", "is_mmdit_name", "CONTEXT_DIM"]

CONTEXT_DIM = 768  # CLIP ViT-L/14 text hidden size (the official context embedder is hard-coded to it)
QK_NORMS = (None, "rms", "ln")


def modulate(x, shift, scale):
    """x·(1 + scale) + shift over tokens; ``shift=None`` (scale-only modulation) adds nothing."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps), optionally times a learned per-channel weight (key ``weight``)."""

    def __init__(self, dim: int, affine: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight.to(dtype=x.dtype)


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    """The affine-free pre-norm of a stream (LayerNorm or RMSNorm, eps 1e-6)."""
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) · w3 x), bias-free; hidden = 2/3 of the MLP width rounded up to a multiple of 256
    (the official ``SwiGLUFeedForward(multiple_of=256)``)."""

    def __init__(self, dim: int, hidden: int, multiple_of: int = 256):
        super().__init__()
        hidden = int(2 * hidden / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)  # built in this order: it fixes the seeded init
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class StreamAttention(nn.Module):
    """One stream's qkv projection (+ per-head q/k norm) and out-projection; the attention itself is joint."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pre_only: bool, qk_norm: str | None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q, self.ln_k = RMSNorm(self.head_dim, True), RMSNorm(self.head_dim, True)
        elif qk_norm == "ln":
            self.ln_q = nn.LayerNorm(self.head_dim, eps=1e-6)
            self.ln_k = nn.LayerNorm(self.head_dim, eps=1e-6)
        else:
            self.ln_q, self.ln_k = nn.Identity(), nn.Identity()

    def qkv_heads(self, x):
        """(B, L, D) -> q, k, v each (B, heads, L, head_dim), q/k normalised per head."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class StreamBlock(nn.Module):
    """One stream of a joint block (the official ``DismantledBlock``): adaLN modulation around the joint
    attention and the MLP. ``pre_only``: modulation of the attention input only (the last context block)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool,
                 rmsnorm: bool, scale_mod_only: bool, swiglu: bool, qk_norm: str | None):
        super().__init__()
        self.pre_only, self.scale_mod_only = pre_only, scale_mod_only
        self.norm1 = _norm(hidden, rmsnorm)
        self.attn = StreamAttention(hidden, num_heads, qkv_bias, pre_only, qk_norm)
        if not pre_only:
            self.norm2 = _norm(hidden, rmsnorm)
            mlp_hidden = int(hidden * mlp_ratio)
            self.mlp = SwiGLU(hidden, mlp_hidden) if swiglu else Mlp(hidden, mlp_hidden)
        n_mods = (1 if pre_only else 4) if scale_mod_only else (2 if pre_only else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n_mods * hidden))

    def modulations(self, c):
        """[shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp]; absent ones are None."""
        n = self.adaLN_modulation[1].out_features // c.shape[-1]
        mods = list(self.adaLN_modulation(c).chunk(n, dim=1))
        if not self.scale_mod_only:  # 6 (or 2 when pre-only), in the order above
            return mods + [None] * (6 - n)
        if self.pre_only:  # scale-only: scale_msa | scale_msa, gate_msa, scale_mlp, gate_mlp
            return [None, mods[0], None, None, None, None]
        return [None, mods[0], mods[1], None, mods[2], mods[3]]

    def pre_attention(self, x, c):
        mods = self.modulations(c)
        return self.attn.qkv_heads(modulate(self.norm1(x), mods[0], mods[1])), mods

    def post_attention(self, x, attn_out, mods):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image streams attending jointly over [context tokens, image tokens]."""

    def __init__(self, hidden: int, num_heads: int, pre_only: bool, **kw):
        super().__init__()
        self.context_block = StreamBlock(hidden, num_heads, pre_only=pre_only, **kw)
        self.x_block = StreamBlock(hidden, num_heads, pre_only=False, **kw)

    def forward(self, context, x, c):
        (cq, ck, cv), c_mods = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_mods = self.x_block.pre_attention(x, c)
        out = F.scaled_dot_product_attention(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))
        B, H, L, hd = out.shape
        out = out.transpose(1, 2).reshape(B, L, H * hd)
        n_ctx = context.shape[1]
        x = self.x_block.post_attention(x, out[:, n_ctx:], x_mods)
        if self.context_block.pre_only:
            return None, x  # the last block's context stream ends here (keys/values only)
        return self.context_block.post_attention(context, out[:, :n_ctx], c_mods), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + Linear(D -> p·p·C)."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class _VectorEmbedder(nn.Module):
    """Linear -> SiLU -> Linear on a pooled conditioning vector (official ``VectorEmbedder``)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, y):
        return self.mlp(y)


class MMDiT(nn.Module):
    """Text-conditioned flow transformer. ``forward(x, t, context=..., y=None)`` returns ``(v, zs)``:
    the velocity (B, C, H', W') and one (B, T, z_dim) tensor per REPA projector.

    x: scaled VAE latents (B, C, H', W'); t: (B,) in [0, 1] (0 = data), fed unscaled; context: (B, L, 768)
    text hidden states (CFG's unconditional branch passes the encoding of the empty caption); y: optional
    pooled vector (B, adm_in_channels), unused by the official recipe.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, depth: int = 24,
                 mlp_ratio: float = 4.0, learn_sigma: bool = False, adm_in_channels: int | None = None,
                 context_dim: int = CONTEXT_DIM, register_length: int = 0, rmsnorm: bool = False,
                 scale_mod_only: bool = False, swiglu: bool = False, out_channels: int | None = None,
                 qk_norm: str | None = None, qkv_bias: bool = True, encoder_depth: int = 8,
                 z_dims: Sequence[int] = (768,), projector_dim: int = 2048):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] (1-indexed tap point), got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        hidden, num_heads = 32 * depth, depth  # official sizing: head_dim 32
        self.in_channels, self.patch_size, self.depth = in_channels, patch_size, depth
        self.out_channels = out_channels or (2 * in_channels if learn_sigma else in_channels)
        self.input_size, self.grid = input_size, input_size // patch_size
        self.encoder_depth, self.z_dims, self.context_dim = encoder_depth, list(z_dims), context_dim
        self.num_heads, self.hidden_size = num_heads, hidden
        self.grad_checkpointing = False  # activation checkpointing of the joint blocks (training only)
        # Built in the official order, so torch.manual_seed(s) gives the official initial weights.
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden)
        if adm_in_channels is not None:
            self.y_embedder = _VectorEmbedder(int(adm_in_channels), hidden)
        self.context_embedder = nn.Linear(context_dim, hidden)
        self.register_length = register_length
        if register_length > 0:
            self.register = nn.Parameter(torch.randn(1, register_length, hidden))
        self.register_buffer("pos_embed", torch.zeros(1, self.grid ** 2, hidden))
        block_kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, rmsnorm=rmsnorm, scale_mod_only=scale_mod_only,
                        swiglu=swiglu, qk_norm=qk_norm)
        self.joint_blocks = nn.ModuleList([JointBlock(hidden, num_heads, pre_only=i == depth - 1, **block_kw)
                                           for i in range(depth)])
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.projectors = nn.ModuleList([build_mlp(hidden, projector_dim, z) for z in self.z_dims])
        self.pos_embed.copy_(get_2d_sincos_pos_embed(hidden, self.grid).float().unsqueeze(0))

    def unpatchify(self, x):
        """(B, T, p·p·C), per-token layout (py, px, c) -> (B, C, H', W')."""
        c, p, g = self.out_channels, self.patch_size, self.grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, c))
        return x.reshape(x.shape[0], c, g * p, g * p)

    def embed(self, x, t, context, y=None):
        """Image tokens, context tokens and the adaLN conditioning vector c = t_emb (+ y_emb)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"MMDiT was built for {self.input_size}x{self.input_size} latents, got "
                             f"{tuple(x.shape[-2:])}; rebuild it with input_size={x.shape[-1]}")
        if context is None or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"MMDiT needs context (B, L, {self.context_dim}) text features, got {got}")
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        # the official casts the frequency embedding to t's dtype, then to the tokens' dtype
        freq = TimestepEmbedder.timestep_embedding(t, self.t_embedder.frequency_embedding_size)
        if torch.is_floating_point(t):
            freq = freq.to(t.dtype)
        c = self.t_embedder.mlp(freq.to(tokens.dtype))
        if y is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)
        if self.register_length:
            context = torch.cat([self.register.expand(x.shape[0], -1, -1), context], dim=1)
        return tokens, context, c

    def forward(self, x, t, y=None, context=None, detach: bool = False):
        """Returns ``(v, zs)``; ``detach=True`` feeds the projectors a detached copy of the stream."""
        x, context, c = self.embed(x, t, context, y)
        B, T, D = x.shape
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        zs = []
        for i, block in enumerate(self.joint_blocks):
            if use_ckpt:
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
            if i + 1 == self.encoder_depth:
                h = x.detach() if detach else x
                zs = [proj(h.reshape(-1, D)).reshape(B, T, -1) for proj in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


#################################################################################
#                                   Configs                                      #
#################################################################################

MMDIT_ARCHS = {"S": dict(depth=12), "B": dict(depth=24), "L": dict(depth=32), "XL": dict(depth=36)}
_PATCH_SIZES = (1, 2, 4, 8)
_DEFAULTS = dict(input_size=32, in_channels=4, mlp_ratio=4.0, context_dim=CONTEXT_DIM, encoder_depth=8,
                 z_dims=[768], projector_dim=2048, qk_norm=None, rmsnorm=False, swiglu=False,
                 scale_mod_only=False, qkv_bias=True, register_length=0, adm_in_channels=None)


def is_mmdit_name(name: str) -> bool:
    return name.startswith("MMDiT-")


def mmdit_config(name: str, **overrides) -> dict:
    """Full, JSON-serialisable MMDiT kwargs for "MMDiT-B/2" (or "MMDiT-d<depth>/<patch>") plus overrides."""
    try:
        arch, patch = name.removeprefix("MMDiT-").split("/")
        depth = dict(MMDIT_ARCHS[arch]) if arch in MMDIT_ARCHS else {"depth": int(arch.removeprefix("d"))}
        cfg = dict(_DEFAULTS, **depth, patch_size=int(patch))
    except (ValueError, KeyError):
        raise ValueError(f"unknown model {name!r}; choose MMDiT-S/2, MMDiT-B/2 (the official recipe), "
                         f"MMDiT-L/2, MMDiT-XL/2 or MMDiT-d<depth>/<patch>") from None
    if cfg["patch_size"] not in _PATCH_SIZES:
        raise ValueError(f"--model {name}: patch size must be one of {_PATCH_SIZES}")
    unknown = set(overrides) - set(cfg) - {"depth", "out_channels", "learn_sigma"}
    if unknown:
        raise ValueError(f"--model-kwargs: unknown MMDiT arguments {sorted(unknown)}")
    cfg.update(overrides)
    cfg["z_dims"] = [int(z) for z in cfg["z_dims"]]
    return cfg


def build_mmdit(name: str, **kwargs) -> MMDiT:
    """``MMDiT(**mmdit_config(name, **kwargs))``."""
    return MMDiT(**mmdit_config(name, **kwargs))


class ContextAsLabels:
    """Calls an MMDiT (or its DDP/compiled wrapper) with the loss's ``y`` argument as ``context``, so the
    class-conditional ``REPALoss`` runs the t2i objective unchanged (the official ``train_t2i.py`` also
    uses the same ``SILoss`` with ``model_kwargs = dict(context=context)``)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, y=None, **extra):
        if extra:
            raise ValueError(f"MMDiT does not support {sorted(extra)} (HASTE attention alignment and "
                             "force_drop_ids are class-conditional SiT features)")
        return self.model(x, t, context=y)


#################################################################################
#              Text-to-image training on shards with text.<k> fields             #
#################################################################################

COUNT_FIELD = R.NUM_CAPTIONS
EMPTY_CONTEXT_FILE = "empty_context.safetensors"  # written by repa-preprocess next to manifest.json


def text_fields(manifest) -> list[str]:
    """``text.<k>`` field names in slot order (empty for class-conditional shards)."""
    return R.text_fields(manifest.fields)


def is_t2i(manifest) -> bool:
    """Shards with caption features train the text-to-image MMDiT (the t2i path of repa-train)."""
    return bool(text_fields(manifest))


def plan_t2i(cfg, manifest, shards_url: str) -> dict:
    """Full MMDiT kwargs from the flags and the manifest; raises ValueError before step 1 on any mismatch."""
    where = f"--shards {shards_url} (manifest.json)"
    texts = text_fields(manifest)
    if not is_mmdit_name(cfg.model):
        raise ValueError(f"{where} holds caption features ({texts[0]}...): train the text-to-image model with "
                         f"--model MMDiT-B/2 (the official recipe) or another MMDiT-*, not {cfg.model}")
    if COUNT_FIELD not in manifest.fields or R.MOMENTS not in manifest.fields:
        raise ValueError(f"{where} lacks '{COUNT_FIELD}' or 'moments'; re-run repa-preprocess on the captioned source")
    two_c, h, w = manifest.fields[R.MOMENTS].shape
    feats = R.teacher_fields(manifest.fields)
    if cfg.proj_coeff and not feats:
        raise ValueError(f"{where} has no teacher features (feat.<i>); re-run repa-preprocess with a teacher "
                         "or train without alignment: --proj-coeff 0")
    if getattr(cfg, "haste", None):
        raise ValueError("--haste is not supported with MMDiT (text-to-image): the official HASTE train_t2i.py "
                         "zeroes its attention loss, so its t2i objective is REPA's; train without --haste")
    overrides = dict(input_size=h, in_channels=two_c // 2, context_dim=manifest.fields[texts[0]].shape[-1],
                     z_dims=[manifest.fields[f].shape[-1] for f in feats],  # none without a teacher, like SiT
                     encoder_depth=cfg.encoder_depth, qk_norm="ln" if cfg.qk_norm else None)
    kwargs = mmdit_config(cfg.model, **{**overrides, **cfg.model_kwargs})
    for key in ("input_size", "in_channels", "context_dim"):
        if kwargs[key] != overrides[key]:
            raise ValueError(f"--model-kwargs sets {key}={kwargs[key]} but {where} implies {overrides[key]}")
    _check_empty_context(shards_url, cfg, manifest.fields[texts[0]].shape)
    if h % kwargs["patch_size"] or not 1 <= kwargs["encoder_depth"] <= kwargs["depth"]:
        raise ValueError(f"--model {cfg.model}: patch size {kwargs['patch_size']} must divide the latent size {h} "
                         f"and --encoder-depth {kwargs['encoder_depth']} be in [1, {kwargs['depth']}]")
    return kwargs


def _check_empty_context(shards_url: str, cfg, shape) -> None:
    """The null context exists and has the text fields' shape (refused before step 1, not at the first drop)."""
    empty = load_empty_context(shards_url, getattr(cfg, "storage_options", None) or None)
    if tuple(empty.shape) != tuple(shape):
        raise ValueError(f"{shards_url}/{EMPTY_CONTEXT_FILE} has shape {tuple(empty.shape)}, the text fields "
                         f"{tuple(shape)}; re-run repa-preprocess (the sidecar belongs to another encoder)")


def load_empty_context(shards_url: str, storage_options=None) -> torch.Tensor:
    """The CFG null context (encoding of the empty caption) stored next to the shards, float32 (L, H)."""
    from safetensors.torch import load
    url = storage.join(shards_url, EMPTY_CONTEXT_FILE)
    if storage.size(url, storage_options) is None:
        raise FileNotFoundError(f"{url} is missing: text-to-image shards need the empty-caption context that "
                                "repa-preprocess writes; re-run repa-preprocess on the captioned source")
    return load(storage.read_bytes(url, storage_options))["empty_context"].float()


def draw_context(batch: dict, fields: list[str], empty: torch.Tensor, cfg_prob: float) -> torch.Tensor:
    """One caption per record (uniform over its ``num_captions``), replaced by ``empty`` with prob. ``cfg_prob``
    (the official CFGDataset). Pops the text fields from ``batch``; returns the (B, L, H) float32 context.

    Both draws use the global CPU generator, which training checkpoints per rank, so a resumed run draws
    the same captions and drops as an uninterrupted one.
    """
    texts = torch.stack([batch.pop(f) for f in fields], dim=1)  # (B, K, L, H)
    counts = batch.pop(COUNT_FIELD).cpu()
    if (counts < 1).any():
        keys = batch["key"][counts < 1].tolist() if "key" in batch else []
        raise ValueError(f"records {keys[:10]} have no caption (num_captions 0); re-create those shards")
    B = texts.shape[0]
    pick = (torch.rand(B) * counts.clamp(max=len(fields))).long().clamp(max=len(fields) - 1)
    drop = torch.rand(B) < cfg_prob
    context = texts[torch.arange(B, device=texts.device), pick.to(texts.device)].float()
    null = empty.to(context.device, context.dtype).expand_as(context)
    return torch.where(drop.to(context.device)[:, None, None], null, context)


@torch.no_grad()
def euler_t2i(model, noise, context, empty, num_steps: int = 50, cfg_scale: float = 4.0,
              guidance_low: float = 0.0, guidance_high: float = 1.0):
    """Euler ODE t=1 -> 0 with CFG against ``empty`` inside [guidance_low, guidance_high] (float64 state,
    the official ``samplers_t2i.euler_sampler`` without Heun)."""
    x = noise.double()
    null = empty.to(context).expand_as(context)
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        xin = torch.cat([x, x]) if guided else x
        cin = torch.cat([context, null]) if guided else context
        tin = torch.full((xin.shape[0],), float(t_cur), device=x.device, dtype=noise.dtype)
        v = model(xin.to(noise.dtype), tin, context=cin)[0].double()
        if guided:
            cond, uncond = v.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        x = x + (t_next - t_cur) * v
    return x


class T2IPreview:
    """EMA sample grid for t2i runs: fixed noise (own generator) and the first records' caption 0."""

    def __init__(self, cfg, model_kwargs, prov, device, shards_url: str, empty: torch.Tensor):
        g = torch.Generator().manual_seed(cfg.seed)
        c, s = model_kwargs["in_channels"], model_kwargs["input_size"]
        self.noise = torch.randn(cfg.num_preview, c, s, s, generator=g).to(device)
        with torch.random.fork_rng(devices=[]):  # never shift the training draws
            stream = ShardStream(shards_url, cfg.num_preview, fields=["text.0"], shuffle=False,
                                 storage_options=cfg.storage_options or None, rank=0, world_size=1)
            first = next(iter(stream))["text.0"]
        self.context = first.float().to(device)
        self.noise = self.noise[: len(self.context)]
        self.empty, self.steps, self.cfg_scale = empty.to(device), cfg.preview_steps, cfg.preview_cfg
        self.decode = PreviewDecoder(prov, device)

    def __call__(self, ema, path):
        z = euler_t2i(ema, self.noise, self.context, self.empty, self.steps, self.cfg_scale).float()
        save_png(path, to_grid(self.decode(z)))


class T2IInputs:
    """What repa-train's loop needs for a t2i run: the fields to read, the per-step context draw, the model
    wrapper that feeds it to the MMDiT, and the preview."""

    def __init__(self, plan, cfg):
        self.fields = text_fields(plan.manifest)
        self.read_fields = [*self.fields, COUNT_FIELD]
        self.shards_url, self.cfg_prob = plan.shards_url, cfg.cfg_prob
        self.empty = load_empty_context(plan.shards_url, cfg.storage_options or None)

    def context(self, batch: dict) -> torch.Tensor:
        return draw_context(batch, self.fields, self.empty, self.cfg_prob)

    def wrap(self, model) -> ContextAsLabels:
        return ContextAsLabels(model)

    def preview(self, cfg, model_kwargs, prov, device) -> T2IPreview:
        return T2IPreview(cfg, model_kwargs, prov, device, self.shards_url, self.empty)
