"""PyTorch port of the TensorFlow FID Inception-v3 (the 2015-12-05 graph the ADM evaluator runs).

The network is torchvision's Inception-v3 layout with the three quirks of the TF graph that pytorch-fid
documented (pool branches that average without counting padding, and a *max* pool in the last block's pool
branch), and 1008 output classes. Parameter names follow torchvision, so the converted weights file
``pt_inception-2015-12-05-6726825d.pth`` (published with pytorch-fid) loads with ``strict=True``.

Outputs, as the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) reads them from the TF graph:

* ``pool3``   (B, 2048): ``pool_3:0``, the global average pool of the last block (FID, precision/recall);
* ``spatial`` (B, 2023): ``mixed_6/conv:0`` (= ``Mixed_6d.branch1x1`` after its ReLU, 17x17x192), first 7
  channels, flattened in NHWC order (sFID);
* ``logits``  (B, 1008): ``pool3 @ W`` with the final layer's weight and *no bias*, as ADM builds its softmax (IS).

Input: uint8 images (B, H, W, 3) (NHWC, as in the npz) or (B, 3, H, W), values 0..255. Like the TF graph, they
are resized to 299x299 with TF1's bilinear resize (``align_corners=False``, no half-pixel offset: source
coordinate = dst * in / out) and normalized as (x - 128) / 128. (pytorch-fid uses PyTorch's half-pixel bilinear
resize and (x - 127.5) / 127.5, which shifts FIDs slightly.)

Weights: ``load_fid_inception(path)``; without a path we look in ``$REPA_CACHE``/``~/.cache/repa`` and in
torch.hub's checkpoint folder (where pytorch-fid caches it), then try to download it; offline this fails fast
saying where to get the file and which flag to pass.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa.preprocess.hub import ModelDownloadError, download_file
from repa.preprocess.hub import cache_dir as repa_cache_dir

__all__ = ["FIDInceptionV3", "load_fid_inception", "tf_resize_bilinear", "FID_WEIGHTS_URL", "FID_WEIGHTS_NAME",
           "InceptionWeightsError"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the first hex digits of the file's SHA-256, as its name says
SPATIAL_CHANNELS = 7


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing or unusable; the message says where to get them."""


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    # the TF graph averages over the valid (unpadded) window only
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x, branch1x1_out: list | None = None):
        b1 = self.branch1x1(x)
        if branch1x1_out is not None:  # the TF graph's "mixed_6/conv" tap (sFID)
            branch1x1_out.append(b1)
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            b1,
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool='avg'`` (Mixed_7b: average without padding) or ``'max'`` (Mixed_7c: the TF graph's max pool)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1),
            self.branch_pool(pooled),
        ], 1)


def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of (B, C, H, W) to (size, size)."""
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    h0, h1, wh = axis(x.shape[2])
    x = x[:, :, h0] * (1 - wh[:, None]) + x[:, :, h1] * wh[:, None]
    w0, w1, ww = axis(x.shape[3])
    return x[:, :, :, w0] * (1 - ww) + x[:, :, :, w1] * ww


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``forward(uint8 images)`` -> dict of pool3 / spatial / logits (module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC/NCHW 0..255 -> float32 NCHW 299x299, (x - 128) / 128 (the TF graph's input ops)."""
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        x = images.to(torch.float32)
        if x.shape[2:] != (299, 299):
            x = tf_resize_bilinear(x, 299)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images.to(self.fc.weight.device))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        tap: list = []
        x = self.Mixed_6e(self.Mixed_6d(x, branch1x1_out=tap))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool3 = x.mean(dim=(2, 3))
        spatial = tap[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        logits = pool3 @ self.fc.weight.t()
        return {"pool3": pool3, "spatial": spatial, "logits": logits}


def _candidates(cache_dir: str | None) -> list[str]:
    dirs = [cache_dir] if cache_dir else []
    dirs.append(repa_cache_dir())
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    return [os.path.join(d, FID_WEIGHTS_NAME) for d in dirs]


def _missing_message(reason: str, dest: str) -> str:
    return (f"FID Inception weights not available ({reason}). Download {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} "
            f"(pytorch-fid's conversion of the TF 2015-12-05 Inception graph) and pass --inception-weights "
            f"/path/to/{FID_WEIGHTS_NAME}, or put it at {dest}")


def load_fid_inception(weights: str | None = None, device="cpu", cache_dir: str | None = None,
                       download: bool = True, timeout: float = 30.0) -> FIDInceptionV3:
    """The FID Inception in eval mode on ``device``; weights from ``weights``, a cache, or a download."""
    path = weights
    if path is None:
        path = next((p for p in _candidates(cache_dir) if os.path.isfile(p)), None)
    if path is None:
        dest = _candidates(cache_dir)[0]
        if not download:
            raise InceptionWeightsError(_missing_message("no local file", dest))
        try:  # the hash prefix is the one in the file's name (pytorch-fid's convention)
            download_file(FID_WEIGHTS_URL, dest, hash_prefix=FID_WEIGHTS_SHA256_PREFIX, what="the FID Inception weights",
                          timeout=timeout)
        except ModelDownloadError as e:
            raise InceptionWeightsError(_missing_message(f"download failed: {e}", dest)) from None
        path = dest
    if not os.path.isfile(path):
        raise InceptionWeightsError(_missing_message(f"--inception-weights {path}: no such file", path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable/unsafe file gets the same instruction
        raise InceptionWeightsError(f"--inception-weights {path}: not a readable weights-only state dict ({e})") \
            from None
    if not isinstance(sd, dict):
        raise InceptionWeightsError(f"--inception-weights {path}: expected a state dict, got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    model = FIDInceptionV3()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InceptionWeightsError(f"--inception-weights {path}: does not match the FID Inception-v3 ({e})") \
            from None
    return model.to(device).eval().requires_grad_(False)
