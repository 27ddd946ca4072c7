"""Image normalisation for repa-preprocess: EXIF transpose, RGB conversion and the ADM center crop.

The crop is the reference `center-crop-dhariwal` transform (docs/reference.md §5.1, identical to guided-diffusion's
`center_crop_arr` and EDM's dataset_tool):

1. while min(W, H) >= 2*S: resize to (W//2, H//2) with BOX resampling;
2. scale = S / min(W, H); resize to (round(W*scale), round(H*scale)) with BICUBIC (Python's round = banker's);
3. center crop S x S at offsets ((H-S)//2, (W-S)//2).

`to_rgb` turns any PIL mode into 8-bit RGB. Like the reference (`Image.convert('RGB')`) an alpha channel is
dropped (not composited). 16/32-bit integer images ("I;16", "I;16B", "I") are scaled to 8 bits with
round(v / 257) instead of PIL's clipping conversion; float images ("F") are assumed to be in [0, 255].
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = ["to_rgb", "adm_center_crop", "load_rgb", "check_resolution"]


def check_resolution(res: int) -> int:
    """Validate a crop resolution: a positive multiple of 16 (the VAE downsamples by 8, SiT patches by 2)."""
    if int(res) != res or res <= 0 or res % 16:
        raise ValueError(f"--res must be a positive multiple of 16 (e.g. 256 or 512), got {res!r}")
    return int(res)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB version of `img` (L, LA, 1, P, PA, CMYK, YCbCr, RGBA, I;16*, I, F, ...)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # PIL warns (and may mis-map) when a palette image with transparency goes straight to RGB.
        img = img.convert("RGBA")
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM center crop of a PIL image to `size` x `size`; returns uint8 HWC (size, size, 3) RGB."""
    img = to_rgb(img)
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size].copy()  # contiguous, writable


def load_rgb(fp, exif_transpose: bool = True) -> Image.Image:
    """Open an image file/path/file-like, fully decode it, apply its EXIF orientation, convert to RGB."""
    with Image.open(fp) as img:
        img.load()
        out = ImageOps.exif_transpose(img) if exif_transpose else img
        out = to_rgb(out)
        return out.copy() if out is img else out  # never hand out the image the `with` closes
