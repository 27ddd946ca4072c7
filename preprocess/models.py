"""The frozen VAE and teachers run on uint8 batches (autocast, channels-last, optional torch.compile)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from repa.shards import records as R
from repa.shards.schema import FieldSpec, feature_spec

from . import teachers as T
from .plan import PRECISIONS, Options, _resolve
from .resume import PreprocessError
from .vae import load_vae


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _load_teachers(enc_type: str, res: int, device: torch.device, compile: bool) -> list:
    names = [e.strip() for e in enc_type.split(",") if e.strip()]
    if not names or names == ["none"]:
        return []
    if "none" in names:
        raise PreprocessError("--enc-type: 'none' cannot be combined with other teachers")
    return list(T.load_teachers(",".join(names), res, device, channels_last=device.type == "cuda",
                                compile=compile))


class Models:
    """The frozen VAE and teachers, run on uint8 batches; returns the per-record arrays of one batch."""

    def __init__(self, opts: Options, device: torch.device):
        opts = _resolve(opts, device)
        self.device = device
        self.opts = opts
        self.vae = load_vae(opts.vae, device)
        self.teachers = _load_teachers(opts.enc_type, opts.res, device, opts.compile)
        self.precision = opts.precision
        self.encode = self.vae.encode_moments
        self.haste_block = None
        if opts.haste:
            if not self.teachers or not hasattr(self.teachers[0], "residual_before"):
                raise PreprocessError("--haste needs a first teacher with residual_before() (a dinov2 "
                                      "teacher, e.g. --enc-type dinov2-vit-b)")
            # HASTE aligns the teacher's last four blocks (DINOv2-B: blocks 8-11, docs/reference.md §7.3); the cache
            # holds the residual stream entering the first of them.
            self.haste_block = max(0, self.teachers[0].depth - 4)
        if opts.compile:  # the teachers compile their own forward (load option)
            self.encode = torch.compile(self.encode)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B,3,R,R) -> {"moments", "feat.i", ["moments_flip", "feat_flip.i", "haste.0"]} on CPU."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.opts.flip:
            x = torch.cat([x, x.flip(-1)]).contiguous(memory_format=torch.channels_last)
        out = {}
        with _autocast(self.device, self.opts.vae_precision):
            m = self.encode(x.float() / 127.5 - 1).float()
        out[R.MOMENTS] = m[:n]
        if self.opts.flip:
            out[R.MOMENTS_FLIP] = m[n:]
        with _autocast(self.device, self.precision):
            for i, fn in enumerate(self.teachers):
                f = fn(x).float()
                out[R.feat(i)] = f[:n]
                if self.opts.flip:
                    out[R.feat_flip(i)] = f[n:]
            if self.haste_block is not None:
                out["haste.0"] = self.teachers[0].residual_before(x[:n], self.haste_block).float()
        return {k: v.cpu() for k, v in out.items()}

    def provenance(self) -> tuple[dict, list]:
        vae = dict(self.vae.provenance)
        teachers = []
        for i, t in enumerate(self.teachers):
            p = dict(t.provenance)
            p["field"] = R.feat(i)
            p["codec"] = self.opts.feature_codec
            teachers.append(p)
        return vae, teachers


def _fields(opts: Options, sample: dict[str, torch.Tensor]) -> dict:
    """Field specs (CONTRACTS.md order: moments, label, feat.i, moments_flip, feat_flip.i, haste.i)."""
    fields = {R.MOMENTS: FieldSpec(tuple(sample[R.MOMENTS].shape[1:]), "float32", "raw"),
              "label": FieldSpec((), "int64", "raw")}
    for name, t in sample.items():
        if R.parse(name)[0] in ("feat", "feat_flip"):
            fields[name] = feature_spec(tuple(t.shape[1:]), opts.feature_codec)
        elif name == "haste.0":
            fields[name] = FieldSpec(tuple(t.shape[1:]), "float16", "fp16")
    if R.MOMENTS_FLIP in sample:
        fields[R.MOMENTS_FLIP] = fields[R.MOMENTS]
    return fields
