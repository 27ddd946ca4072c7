"""SiT (Scalable Interpolant Transformer) with REPA projectors, in one readable file.

This is a from-scratch re-implementation of REPA's ``models/sit.py`` (itself DiT's ``models.py`` with
projector heads), written to be *state-dict compatible* with the official checkpoints: module names and
parameter shapes are exactly the reference's (docs/reference.md §1.2), so the official SiT-XL/2 ``last.pt``
loads with ``strict=True``. There is no timm dependency; the timm modules the reference uses
(``PatchEmbed``, ``Attention``, ``Mlp``) are re-written below with the same parameter names.

Differences from the reference (all deliberate, none change the numerics of a published recipe):
  * SiT-S works (its final layer uses ``decoder_hidden_size = hidden_size``; the reference's is 768).
  * /1 variants exist (same formulas, T = H'·W').
  * ``encoder_depth`` outside ``[1, depth]`` raises at construction instead of crashing in ``forward``.
  * ``qk_norm=True`` builds ``LayerNorm(head_dim)`` (eps 1e-5, affine) like older timm did.
  * ``model(x, t, y, return_attn=True)`` also returns the pre-softmax attention logits of blocks
    ``0..encoder_depth-1`` (HASTE, docs/reference.md §7.2); they are only computed when asked for.
  * ``resample_tokens`` maps teacher tokens onto the student's token grid when the counts differ.

Conventions: x is the scaled VAE latent (B, C, H', W'); t in [0, 1] (0 = data, 1 = noise), fed
unscaled; y the class index, ``num_classes`` being the null (CFG) class.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SiT", "SiT_models", "SiT_ARCHS", "model_config", "build_model", "resample_tokens",
    "get_2d_sincos_pos_embed", "TimestepEmbedder", "LabelEmbedder",
]


def modulate(x, shift, scale):
    """adaLN modulation x·(1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for patches, timesteps and class labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = p) patchifier; tokens in row-major grid order (docs/reference.md §1.3)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"SiT was built for {self.input_size}x{self.input_size} latents, got "
                             f"{tuple(x.shape[-2:])}; rebuild the model with input_size={x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps t in [0, 1] (unscaled) into D-dim vectors (docs/reference.md §1.5)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        """Sinusoidal embedding [cos(t·f_m), sin(t·f_m)], f_m = max_period^(-m/half), cos block first.

        t: (B,) tensor. Returns (B, dim) float32 (the caller casts to t's dtype).
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class-label embedding with label dropout for classifier-free guidance (docs/reference.md §1.6).

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; row ``num_classes`` is the null class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class: at random with prob. dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or force_drop_ids is not None:
            if not use_dropout:
                raise ValueError("force_drop_ids needs a null class: build the model with class_dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj, q_norm, k_norm).

    ``fused_attn=True`` uses ``F.scaled_dot_product_attention``; ``False`` the explicit
    softmax((q·hd^-0.5)·kᵀ)·v of timm (the reference's generate.py default). The two agree to float
    rounding. With ``return_attn=True`` the pre-softmax logits are computed explicitly, returned, and
    reused for the attention itself (whatever ``fused_attn`` says).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn: bool = False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = None
        if return_attn or not self.fused_attn:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T), pre-softmax
            x = logits.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(B, T, D))
        return x, (logits if return_attn else None)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, timm's parameter names."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A SiT block with adaptive layer norm zero (adaLN-Zero) conditioning (docs/reference.md §1.7)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, return_attn: bool = False):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attn_out, logits = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), return_attn=return_attn)
        x = x + gate_msa.unsqueeze(1) * attn_out
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, logits


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + Linear(D -> p·p·C) (docs/reference.md §1.9)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, z) (docs/reference.md §1.8)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(nn.Module):
    """Diffusion/flow transformer backbone with REPA projector heads.

    ``forward(x, t, y)`` returns ``(v, zs)``: the velocity (B, C, H', W') and a list with one
    (B, T, z_dim) tensor per projector, computed from the residual stream after block
    ``encoder_depth - 1`` (``encoder_depth`` is 1-indexed, docs/reference.md §1.8).
    """

    def __init__(
        self,
        path_type: str = "linear",
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: int | None = None,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = False,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        fused_attn: bool = True,
        **block_kwargs,
    ):
        super().__init__()
        decoder_hidden_size = hidden_size if decoder_hidden_size is None else decoder_hidden_size
        if decoder_hidden_size != hidden_size:
            raise ValueError(f"decoder_hidden_size ({decoder_hidden_size}) must equal hidden_size ({hidden_size})")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] (1-indexed tap point), got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos positional embedding)")
        unknown = set(block_kwargs) - {"qkv_bias", "attn_drop", "proj_drop"}  # tolerated, fixed as in the reference
        if unknown:
            raise TypeError(f"SiT got unexpected keyword arguments {sorted(unknown)}")
        self.path_type = path_type
        self.use_cfg = use_cfg
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)
        self.grad_checkpointing = False  # activation checkpointing of the blocks (training only)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; an nn.Parameter (not a buffer) so the official state dict loads.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        ])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(decoder_hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Initialization of docs/reference.md §1.10, in the reference's order."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # xavier over the (D, C·p·p) view
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    @property
    def grid_size(self) -> int:
        """Side of the (square) token grid: input_size // patch_size."""
        return self.x_embedder.grid_size

    def set_fused_attn(self, fused: bool) -> None:
        """Select SDPA (True) or the explicit softmax (False) in every block."""
        for block in self.blocks:
            block.attn.fused_attn = fused

    def unpatchify(self, x):
        """(B, T, p·p·C) with per-token layout (py, px, c) -> (B, C, H', W') (docs/reference.md §1.9)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs a square token grid, got {x.shape[1]} tokens")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, return_attn: bool = False, force_drop_ids=None, return_logvar: bool = False):
        """Forward pass.

        x: (B, C, H', W') noisy latents; t: (B,) times in [0, 1]; y: (B,) int64 labels.
        force_drop_ids: optional (B,) tensor, 1 = replace the label by the null class (any mode).
        Returns ``(v, zs)``, or ``(v, zs, attn_logits)`` with ``return_attn=True`` where attn_logits is
        a list of the pre-softmax (q·hd^-0.5)·kᵀ of blocks 0..encoder_depth-1, each (B, heads, T, T).
        ``return_logvar`` exists for signature compatibility with the reference and is ignored, as there.
        """
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        B, T, D = x.shape
        zs, attn_logits = [], []
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            want_attn = return_attn and i < self.encoder_depth
            if use_ckpt:
                x, logits = checkpoint(block, x, c, want_attn, use_reentrant=False)
            else:
                x, logits = block(x, c, want_attn)
            if want_attn:
                attn_logits.append(logits)
            if i + 1 == self.encoder_depth:
                zs = [projector(x.reshape(-1, D)).reshape(B, T, -1) for projector in self.projectors]
        x = self.unpatchify(self.final_layer(x, c))
        if return_attn:
            return x, zs, attn_logits
        return x, zs


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: any shape of positions -> (N, embed_dim) float64 [sin(pos·ω), cos(pos·ω)], ω_m = 10000^(-m/(E/2))."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(G·G, D) float64 table; token k = i·G + j (row i, column j).

    The first D/2 channels encode the column j, the second D/2 the row i (docs/reference.md §1.4: the reference
    names the first half "emb_h" but builds it from the w-coordinate grid).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_cols = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    emb_rows = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    return torch.cat([emb_cols, emb_rows], dim=1)


#################################################################################
#                   Teacher tokens on a different token grid                     #
#################################################################################

def resample_tokens(z: torch.Tensor, grid_hw, src_grid_hw=None) -> torch.Tensor:
    """Resample teacher tokens (B, T_t, D) on a row-major 2-D grid onto the student's grid.

    The reference pairs teacher token k with student token k and so requires equal counts (docs/reference.md
    2.4; e.g. SiT-*/4 at 256 px has 8x8 tokens while DINOv2-B gives 16x16). We instead treat the teacher
    tokens as a D-channel image and resize it to the student grid:
      * shrinking (student grid smaller): ``area`` interpolation, i.e. each student token gets the mean of
        the teacher tokens its patch covers (exact 2x2 average pooling for 16x16 -> 8x8);
      * growing: ``bilinear`` (align_corners=False).
    Computed in float32, returned in z's dtype. ``src_grid_hw`` defaults to the square grid sqrt(T_t).
    Returns z unchanged when the grids already match.
    """
    gh, gw = (grid_hw, grid_hw) if isinstance(grid_hw, int) else tuple(grid_hw)
    B, T, D = z.shape
    if src_grid_hw is None:
        side = math.isqrt(T)
        if side * side != T:
            raise ValueError(f"teacher has {T} tokens, not a square grid: pass src_grid_hw")
        src_grid_hw = (side, side)
    sh, sw = (src_grid_hw, src_grid_hw) if isinstance(src_grid_hw, int) else tuple(src_grid_hw)
    if sh * sw != T:
        raise ValueError(f"teacher grid {sh}x{sw} does not match its {T} tokens")
    if (sh, sw) == (gh, gw):
        return z
    img = z.float().transpose(1, 2).reshape(B, D, sh, sw)
    if gh <= sh and gw <= sw:
        img = F.interpolate(img, size=(gh, gw), mode="area")
    else:
        img = F.interpolate(img, size=(gh, gw), mode="bilinear", align_corners=False)
    return img.reshape(B, D, gh * gw).transpose(1, 2).to(z.dtype)


#################################################################################
#                                   SiT Configs                                  #
#################################################################################

SiT_ARCHS = {  # docs/reference.md §1.1
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
_PATCH_SIZES = (1, 2, 4, 8)

_DEFAULTS = dict(
    input_size=32, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
    encoder_depth=8, projector_dim=2048, z_dims=[768], qk_norm=False, fused_attn=True,
    path_type="linear", use_cfg=True,
)


def model_config(name: str, **overrides) -> dict:
    """Full SiT constructor kwargs for a registry name like "SiT-B/2", with overrides applied.

    The result is JSON-serialisable; the trainer stores it in checkpoints and ``SiT(**cfg)`` rebuilds the
    model. Architecture keys (depth, hidden_size, num_heads, patch_size) may be overridden too.
    """
    try:
        arch, patch = name.removeprefix("SiT-").split("/")
        cfg = dict(_DEFAULTS, **SiT_ARCHS[arch], patch_size=int(patch))
    except (ValueError, KeyError):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(SiT_models)}") from None
    cfg.update(overrides)
    if cfg.get("decoder_hidden_size") is None:
        cfg["decoder_hidden_size"] = cfg["hidden_size"]
    cfg["z_dims"] = [int(z) for z in cfg["z_dims"]]
    return cfg


def build_model(name: str, **kwargs) -> SiT:
    """``SiT(**model_config(name, **kwargs))``."""
    return SiT(**model_config(name, **kwargs))


def _factory(arch: str, patch: int):
    def make(**kwargs) -> SiT:
        return SiT(**{**SiT_ARCHS[arch], "patch_size": patch, **kwargs})
    make.__name__ = f"SiT_{arch}_{patch}"
    make.__doc__ = f"SiT-{arch}/{patch}: {SiT_ARCHS[arch]}, patch size {patch}; kwargs go to SiT."
    return make


# Registry like the reference's: SiT_models["SiT-XL/2"](input_size=32, z_dims=[768], encoder_depth=8, ...).
SiT_models = {f"SiT-{a}/{p}": _factory(a, p) for a in SiT_ARCHS for p in _PATCH_SIZES}
