"""Frozen teacher encoders for REPA/HASTE: loading, reference preprocessing, patch-token features.

One class, :class:`Teacher`, wraps every supported encoder behind the same interface::

    teacher = load_teacher("dinov2-vit-b", resolution=256)
    feats = teacher(images_uint8)          # (B, 3, R, R) uint8 -> (B, T, D) float32
    teacher.provenance                     # recorded in the shard manifest

Supported ``enc_type`` strings (docs/reference.md section 4):

* ``dinov2-vit-{s,b,l,g}`` and the register variants (``dinov2-vit-b-reg`` or the reference's
  ``dinov2reg-vit-b``): timm weights (``timm/vit_base_patch14_dinov2.lvd142m`` ...), else torch.hub
  ``facebookresearch/dinov2`` (converted to the same timm module). x/255 -> ImageNet normalize ->
  bicubic (antialias=False) resize; final-norm patch tokens, CLS and registers removed.
* ``clip-vit-L``: OpenAI CLIP ViT-L/14 image tower (timm ``vit_large_patch14_clip_224.openai`` with
  QuickGELU). x/255 -> resize -> CLIP normalize; tokens before ``ln_post``, CLS removed.
* ``mocov3-vit-{s,b,l}``, ``mae-vit-l``, ``jepa-vit-h``: local checkpoints under ``./ckpts/`` (see
  ``_LOCAL_CKPTS``), loaded with ``torch.load(weights_only=True)`` or from a ``.safetensors`` twin.
* ``timm:<name>``: anything ``timm.create_model`` accepts, including ``timm:local-dir:PATH`` and
  ``timm:hf-hub:REPO``, with ``pretrained=True, num_classes=0`` and the model's own mean/std.

Input size. Teacher tokens must line up with the student's tokens (SiT /2 on the R/8 latent sees a
(R/16) x (R/16) grid), so a patch-``p`` ViT gets an input side of ``p * R/16``: 224 at 256 px and 448 at
512 px for DINOv2 (the reference's ``224 * (R // 256)``), 256 for the patch-16 MoCo v3 / MAE models (no
resize, as in the reference) and 28 / 56 for the tiny resolutions 32 / 64 used in tests. The absolute
positional embedding is resampled ONCE at load time to that grid with timm ``resample_abs_pos_embed``
(bicubic, antialias=True, fp32, prefix positions kept), exactly what the reference does to DINOv2's 37x37
table. Non-ViT timm models (convnets) get the pretrained input size scaled by R/256 and return their final
feature map flattened row-major to tokens.

Precision: the teacher runs in the dtype it was loaded in (fp32); the caller wraps calls in
``torch.autocast`` for bf16/fp16 (the reference runs teachers under fp16 autocast). Outputs are always
returned as float32. ``channels_last`` (default: on for CUDA) and ``compile`` are load options.

HASTE (docs/reference.md section 7): :meth:`Teacher.residual_before` returns the residual stream entering a
block, :meth:`Teacher.forward_from` runs the remaining blocks and returns the final features plus the
pre-softmax attention logits ``(q * hd**-0.5) @ k^T`` of the requested blocks, prefix rows/columns removed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hub import ModelDownloadError, download_guard, is_offline, unreachable

__all__ = ["Teacher", "load_teacher", "load_teachers", "teacher_input_size",
           "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DINOV2_TIMM = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_LOCAL_HINT = "--enc-type timm:local-dir:/path/to/dir (a folder with config.json and model.safetensors)"


def _timm():
    import timm  # local import: importing timm costs ~1 s, not needed by every user of this module
    return timm


def teacher_input_size(patch_size: int, resolution: int) -> int:
    """Input side for a patch-``patch_size`` ViT at dataset resolution R: ``patch * R/16`` (R % 16 == 0)."""
    if resolution % 16 != 0 or resolution <= 0:
        raise ValueError(f"--res {resolution}: the teacher token grid is R/16 per side, so the resolution "
                         f"must be a positive multiple of 16 (e.g. 256 or 512)")
    return patch_size * (resolution // 16)


@dataclass(frozen=True)
class _Recipe:
    """How an encoder's input is prepared and its output read (docs/reference.md section 4 table)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    norm_name: str = "imagenet"
    resize_first: bool = False       # CLIP resizes before normalizing; everything else after
    final_norm: bool = True          # MAE and CLIP (no ln_post) read the pre-final-norm tokens


class Teacher(nn.Module):
    """A frozen encoder plus its reference preprocessing. Call on uint8 (B,3,R,R) -> (B,T,D) float32."""

    def __init__(self, model: nn.Module, *, name: str, model_id: str | None, resolution: int,
                 recipe: _Recipe = _Recipe(), grid: tuple[int, int] | None = None,
                 device: str | torch.device = "cpu", channels_last: bool | None = None,
                 compile: bool = False):
        super().__init__()
        timm = _timm()
        self.name, self.model_id, self.resolution, self.recipe = name, model_id, int(resolution), recipe
        self.model = model
        self.is_vit = isinstance(model, timm.models.VisionTransformer)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)) if self.is_vit else 0
        if self.is_vit:
            patch = model.patch_embed.patch_size[0]
            side = teacher_input_size(patch, resolution) if grid is None else patch * grid[0]
            self.input_size = (side, side) if grid is None else (patch * grid[0], patch * grid[1])
            _resample_vit_to(model, self.input_size)
            self.grid = tuple(model.patch_embed.grid_size)
        else:                                       # convnets and other timm families
            cfg_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
            side = max(1, round(cfg_size[-1] * resolution / 256))
            self.input_size = (side, side)
            if hasattr(model, "set_input_size"):    # e.g. EVA: timm resamples its pos-embed itself
                model.set_input_size(img_size=self.input_size)
            self.grid = None                        # known after the first forward (probe below)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(recipe.mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(recipe.std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.to(device)
        dev = torch.device(device)
        self.channels_last = (dev.type == "cuda") if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.grid is None:
            with torch.no_grad():
                probe = self._tokens(torch.zeros(1, 3, *self.input_size, device=dev))
            t = probe.shape[1]
            s = int(round(t ** 0.5))
            self.grid = (s, s) if s * s == t else (1, t)
        self.embed_dim = int(getattr(model, "embed_dim", None) or getattr(model, "num_features"))
        self.num_tokens = self.grid[0] * self.grid[1]
        self._features = torch.compile(self._tokens) if compile else self._tokens
        self.eval()

    # ------------------------------------------------------------------ preprocessing / forward
    @property
    def depth(self) -> int:
        return len(self.model.blocks) if self.is_vit else 0

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads) if self.is_vit else 0

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,R,R) -> normalized float32 (B,3,in,in), in the reference's order and kernel."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher {self.name}: expected images (B, 3, R, R), got {tuple(images.shape)}")
        x = images.to(device=self.mean.device, dtype=torch.float32) / 255.0
        if self.recipe.resize_first:
            x = self._resize(x)
            x = (x - self.mean) / self.std
        else:
            x = (x - self.mean) / self.std
            x = self._resize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(self.input_size):
            return x
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=False)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + prefix tokens + positional embedding: the residual entering block 0."""
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm (unless the recipe reads pre-norm tokens), prefix tokens removed, float32."""
        if self.recipe.final_norm:
            h = self.model.norm(h)
        return h[:, self.num_prefix_tokens:].float()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            return self._head(self.model.blocks(self._embed(x)))
        out = self.model.forward_features(x)
        if out.ndim == 4:                          # conv feature map (B, C, h, w) -> row-major tokens
            return out.flatten(2).transpose(1, 2).float()
        return out[:, int(getattr(self.model, "num_prefix_tokens", 0)):].float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,3,R,R) -> patch-token features (B, T, D) float32."""
        self._check_resolution(images)
        return self._features(self.preprocess(images))

    def _check_resolution(self, images: torch.Tensor) -> None:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"teacher {self.name} was loaded for {self.resolution}px images, got "
                             f"{tuple(images.shape[-2:])}; load it with resolution={images.shape[-1]}")

    # ------------------------------------------------------------------ HASTE partial forward
    def _require_vit(self, what: str) -> None:
        if not self.is_vit:
            raise NotImplementedError(f"teacher {self.name}: {what} needs a timm VisionTransformer "
                                      f"(DINOv2 or timm:<vit>), got {type(self.model).__name__}")

    @torch.no_grad()
    def residual_before(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The residual stream entering block ``block`` (0..depth), (B, prefix + T, D) float32."""
        self._require_vit("residual_before")
        if not 0 <= block <= self.depth:
            raise ValueError(f"teacher {self.name}: block {block} out of range 0..{self.depth}")
        self._check_resolution(images)
        h = self._embed(self.preprocess(images))
        for blk in self.model.blocks[:block]:
            h = blk(h)
        return h.float()

    @torch.no_grad()
    def forward_from(self, residual: torch.Tensor, block: int, attn_blocks=(8, 9, 10, 11)):
        """Run blocks ``block..depth-1`` on a residual stream from :meth:`residual_before`.

        Returns ``(features (B,T,D) float32, [logits (B, heads, T, T) per block in attn_blocks])`` where the
        logits are the pre-softmax ``(q * head_dim**-0.5) @ k^T`` of patch queries against patch keys (the
        prefix rows and columns dropped, as HASTE's ``[:, :, 1:, 1:]``). Logits keep the compute dtype
        (fp16 under fp16 autocast, like the reference).
        """
        self._require_vit("forward_from")
        attn_blocks = tuple(int(b) for b in attn_blocks)
        bad = [b for b in attn_blocks if not block <= b < self.depth]
        if bad:
            raise ValueError(f"teacher {self.name}: attention blocks {bad} are not in the blocks run by "
                             f"forward_from(block={block}) (valid: {block}..{self.depth - 1}); store the "
                             f"residual of an earlier block (--haste start block)")
        expected = self.num_prefix_tokens + self.num_tokens
        if residual.ndim != 3 or residual.shape[1] != expected or residual.shape[2] != self.embed_dim:
            raise ValueError(f"teacher {self.name}: residual must be (B, {expected}, {self.embed_dim}), "
                             f"got {tuple(residual.shape)}")
        h = residual.to(device=self.mean.device, dtype=self.model.pos_embed.dtype
                        if self.model.pos_embed is not None else torch.float32)
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for b in attn_blocks:
            attn = self.model.blocks[b].attn
            if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
                raise NotImplementedError(f"teacher {self.name}: block {b} attention "
                                          f"({type(attn).__name__}) has no fused qkv projection")
            handles.append(attn.qkv.register_forward_hook(
                lambda _m, _i, out, b=b: captured.__setitem__(b, out)))
        try:
            for blk in self.model.blocks[block:]:
                h = blk(h)
        finally:
            for hd in handles:
                hd.remove()
        logits = [self._attn_logits(self.model.blocks[b].attn, captured[b]) for b in attn_blocks]
        return self._head(h), logits

    def _attn_logits(self, attn: nn.Module, qkv_out: torch.Tensor) -> torch.Tensor:
        B, N, _ = qkv_out.shape
        qkv = qkv_out.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        p = self.num_prefix_tokens
        q, k = q[:, :, p:], k[:, :, p:]
        return (q * attn.scale) @ k.transpose(-2, -1)

    # ------------------------------------------------------------------ provenance
    @property
    def provenance(self) -> dict:
        r = self.recipe
        if r.norm_name in ("imagenet", "clip"):
            norm = f"{r.norm_name}-normalize"
        else:
            norm = f"normalize(mean={list(r.mean)}, std={list(r.std)})"
        if tuple(self.input_size) == (self.resolution, self.resolution):
            resize = None
        else:
            side = self.input_size[0] if self.input_size[0] == self.input_size[1] else list(self.input_size)
            resize = f"bicubic(antialias=False) to {side}"
        steps = ["x/255"] + ([resize, norm] if r.resize_first else [norm, resize])
        if not r.final_norm:
            steps.append("pre-final-norm tokens")
        return {
            "name": self.name, "id": self.model_id,
            "input_size": self.input_size[0] if self.input_size[0] == self.input_size[1]
            else list(self.input_size),
            "tokens": self.num_tokens, "dim": self.embed_dim, "grid": list(self.grid),
            "preprocess": ", ".join(s for s in steps if s),
            "prefix_tokens": self.num_prefix_tokens, "depth": self.depth, "heads": self.num_heads,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, id={self.model_id!r}, input_size={self.input_size}, grid={self.grid}"


# ---------------------------------------------------------------------- positional-embedding resampling
def _resample_vit_to(model: nn.Module, img_size: tuple[int, int]) -> None:
    """Resample a timm ViT's absolute pos-embed to ``img_size`` once (bicubic, antialias=True, fp32).

    This is the reference's DINOv2 treatment (timm ``resample_abs_pos_embed`` on the table, prefix
    positions kept as they are); the model then sees inputs of exactly ``img_size``.
    """
    from timm.layers import resample_abs_pos_embed
    pe = model.patch_embed
    old_grid = tuple(pe.grid_size)
    pe.set_input_size(img_size=img_size)
    new_grid = tuple(pe.grid_size)
    if model.pos_embed is None or (new_grid == old_grid and
                                   model.pos_embed.shape[1] == new_grid[0] * new_grid[1] +
                                   (0 if model.no_embed_class else model.num_prefix_tokens)):
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        new = resample_abs_pos_embed(model.pos_embed.detach().float(), new_size=list(new_grid),
                                     old_size=list(old_grid), num_prefix_tokens=prefix,
                                     interpolation="bicubic", antialias=True)
    model.pos_embed = nn.Parameter(new.to(model.pos_embed.dtype), requires_grad=False)
    model.dynamic_img_size = False


# ---------------------------------------------------------------------- loaders
def _create_timm(name: str, label: str, **kwargs) -> nn.Module:
    timm = _timm()
    if name.startswith("local-dir:"):
        path = name[len("local-dir:"):]
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"--enc-type {label}: '{path}' is not a timm model folder (no config.json). Write one with "
                f"timm.models.push_to_hf.save_for_hf(model, PATH, safe_serialization=True)")
    with download_guard(label, _LOCAL_HINT):
        _prefetch_timm_weights(name)
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)


def _prefetch_timm_weights(name: str) -> None:
    """Make sure a hub-hosted timm checkpoint is available BEFORE the model is built.

    timm initialises the random weights first and downloads afterwards; for a ViT-L/g that is many
    seconds to minutes of wasted time before a download error. ``hf-hub:``/``local-dir:`` names are left
    to timm (it reads their config.json first, which fails fast by itself).
    """
    if ":" in name:
        return
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        cfg = _timm().models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown/odd names: let timm.create_model report them
        return
    if cfg is None or not cfg.hf_hub_id:
        return
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files):
        return
    if constants.is_offline_mode():
        raise LocalEntryNotFoundError(f"{cfg.hf_hub_id}: none of {files} is in the local cache (offline mode)")
    for i, f in enumerate(files):
        try:
            hf_hub_download(cfg.hf_hub_id, f)
            return
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:
            if i == len(files) - 1:
                raise


def _load_dinov2(enc_type: str, size: str, reg: bool) -> tuple[nn.Module, str]:
    """DINOv2 through timm (preferred) or torch.hub; both end up as the same timm module."""
    timm_name = f"vit_{_DINOV2_TIMM[size]}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m"
    try:
        return _create_timm(timm_name, enc_type), f"timm/{timm_name}"
    except ModelDownloadError as timm_err:
        hub_name = f"dinov2_vit{size}14{'_reg' if reg else ''}"
        try:
            return _load_dinov2_hub(hub_name, timm_name, enc_type), f"facebookresearch/dinov2:{hub_name}"
        except ModelDownloadError as hub_err:
            raise ModelDownloadError(
                f"Could not load teacher '{enc_type}' from timm ({timm_name}) nor torch.hub "
                f"(facebookresearch/dinov2:{hub_name}).\n  timm: {str(timm_err).splitlines()[0]}\n"
                f"  torch.hub: {str(hub_err).splitlines()[0]}\n"
                + str(timm_err).split("\n", 1)[1]) from timm_err


def _load_dinov2_hub(hub_name: str, timm_name: str, label: str) -> nn.Module:
    """torch.hub DINOv2 -> state dict -> timm module (timm's own DINOv2 converter)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    hub_dir = torch.hub.get_dir()
    repo_dir = os.path.join(hub_dir, "facebookresearch_dinov2_main")
    ckpt = os.path.join(hub_dir, "checkpoints", f"{hub_name.replace('_reg', '_reg4')}_pretrain.pth")
    if is_offline() and not (os.path.isdir(repo_dir) and os.path.isfile(ckpt)):
        raise ModelDownloadError(f"Could not load model '{label}': HF_HUB_OFFLINE=1 is set and torch.hub has "
                                 f"no cached copy ({repo_dir}, {ckpt}).")
    if not os.path.isdir(repo_dir):
        dead = unreachable("https://github.com")
        if dead:
            raise ModelDownloadError(f"Could not load model '{label}': torch.hub needs github.com: {dead}.")
    with download_guard(label, _LOCAL_HINT, hub=False):
        if os.path.isdir(repo_dir):
            hub_model = torch.hub.load(repo_dir, hub_name, source="local", pretrained=True)
        else:
            hub_model = torch.hub.load("facebookresearch/dinov2", hub_name, trust_repo=True)
    state = {k: v for k, v in hub_model.state_dict().items() if not k.startswith("head.")}
    with torch.device("meta"):              # no random init: every tensor comes from the checkpoint
        model = _timm().create_model(timm_name.split(".")[0], pretrained=False, num_classes=0)
    _load_exact(model, checkpoint_filter_fn(state, model), f"torch.hub {hub_name}")
    return model


def _load_exact(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into a meta-device ``model`` (assign=True); every parameter/buffer must be covered."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise ValueError(f"{source}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, uninitialised {left[:5]})")


# name -> (checkpoint file stem, timm VisionTransformer kwargs, state-dict key, recipe)
_LOCAL_CKPTS = {
    "mocov3-vit-s": ("mocov3_vits", dict(patch_size=16, embed_dim=384, depth=12, num_heads=12), "state_dict",
                     _Recipe()),
    "mocov3-vit-b": ("mocov3_vitb", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), "state_dict",
                     _Recipe()),
    "mocov3-vit-l": ("mocov3_vitl", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), "state_dict",
                     _Recipe()),
    "mae-vit-l": ("mae_vitl", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), "model",
                  _Recipe(final_norm=False)),
    "jepa-vit-h": ("ijepa_vith", dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, class_token=False,
                                      global_pool="avg"), "encoder", _Recipe()),
}
_DROP_PREFIXES = ("head.", "fc.", "fc_norm.", "decoder", "mask_token", "predictor", "momentum_encoder")


def _load_local_ckpt(enc_type: str, ckpt_dir: str = "ckpts") -> tuple[nn.Module, str, _Recipe]:
    """MoCo v3 / MAE / I-JEPA ViTs from ``./ckpts`` (no public download: the user places the file)."""
    stem, arch, key, recipe = _LOCAL_CKPTS[enc_type]
    candidates = [os.path.join(ckpt_dir, stem + ext) for ext in (".safetensors", ".pth")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise ModelDownloadError(
            f"Teacher '{enc_type}' needs its checkpoint at {candidates[1]} (or {candidates[0]}), relative to "
            f"the working directory, as in the REPA repository (MoCo v3 from the RCG release, MAE "
            f"'mae_pretrain_vit_large.pth', I-JEPA 'IN1K-vit.h.14-300e.pth.tar'). Put the file there, or use "
            f"--enc-type timm:<name> / timm:local-dir:PATH for a timm-format copy.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickled objects besides tensors
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({err}); convert it "
                             f"once to {candidates[0]} (safetensors) from a trusted environment") from err
        state = raw.get(key, raw) if isinstance(raw, dict) else raw
    fixed = {}
    for k, v in state.items():
        for pre in ("module.base_encoder.", "base_encoder.", "module."):
            if k.startswith(pre):
                k = k[len(pre):]
                break
        if not k.startswith(_DROP_PREFIXES):
            fixed[k] = v
    from timm.models.vision_transformer import VisionTransformer
    pe = fixed.get("pos_embed")
    n_prefix = 0 if arch.get("class_token", True) is False else 1
    side = int(round(((pe.shape[1] - n_prefix) if pe is not None else 196) ** 0.5))
    with torch.device("meta"):
        model = VisionTransformer(img_size=side * arch["patch_size"], num_classes=0, **arch)
    _load_exact(model, fixed, f"{path} ({enc_type})")
    return model, os.path.abspath(path), recipe


def load_teacher(enc_type: str, resolution: int, device: str | torch.device = "cpu", *,
                 channels_last: bool | None = None, compile: bool = False,
                 grid: tuple[int, int] | None = None) -> Teacher:
    """Load one frozen teacher by its ``--enc-type`` name for images of side ``resolution``."""
    name = enc_type.strip()
    low = name.lower()
    kw = dict(name=name, resolution=resolution, device=device, channels_last=channels_last, compile=compile,
              grid=grid)
    teacher_input_size(1, resolution)  # validates the resolution before any download
    if low.startswith("timm:"):
        model = _create_timm(name[len("timm:"):], name)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        norm_name = "imagenet" if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else \
            "clip" if (mean, std) == (CLIP_MEAN, CLIP_STD) else "custom"
        model_id = name[len("timm:"):]
        if model_id.startswith("local-dir:"):
            model_id = "local-dir:" + os.path.abspath(model_id[len("local-dir:"):])
        return Teacher(model, model_id=model_id, recipe=_Recipe(mean, std, norm_name), **kw)
    m = re.fullmatch(r"dinov2(?:[-_]?reg)?-vit-([sblg])(?:-reg)?", low)
    if m:
        model, model_id = _load_dinov2(name, m.group(1), "reg" in low)
        return Teacher(model, model_id=model_id, **kw)
    if low == "clip-vit-l":
        model = _create_timm("vit_large_patch14_clip_224.openai", name, act_layer="quick_gelu")
        recipe = _Recipe(CLIP_MEAN, CLIP_STD, "clip", resize_first=True, final_norm=False)
        return Teacher(model, model_id="timm/vit_large_patch14_clip_224.openai", recipe=recipe, **kw)
    if low in _LOCAL_CKPTS:
        model, model_id, recipe = _load_local_ckpt(low)
        return Teacher(model, model_id=model_id, recipe=recipe, **kw)
    raise ValueError(
        f"--enc-type: unknown teacher '{enc_type}'. Use dinov2-vit-{{s,b,l,g}}[-reg], clip-vit-L, "
        f"mocov3-vit-{{s,b,l}}, mae-vit-l, jepa-vit-h, or timm:<model name | hf-hub:REPO | local-dir:PATH>")


def load_teachers(enc_types: str, resolution: int, device: str | torch.device = "cpu",
                  **kwargs) -> list[Teacher]:
    """``--enc-type`` comma-separated list -> list of teachers (feature fields feat.0, feat.1, ...)."""
    names = [n.strip() for n in enc_types.split(",") if n.strip()]
    if not names:
        raise ValueError("--enc-type: empty teacher list")
    return [load_teacher(n, resolution, device, **kwargs) for n in names]
