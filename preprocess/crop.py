"""Image normalisation for repa-preprocess: EXIF transpose, RGB conversion, the ADM center crop, size limits.

The crop is the reference `center-crop-dhariwal` transform (docs/reference.md §5.1, identical to guided-diffusion's
`center_crop_arr` and EDM's dataset_tool):

1. while min(W, H) >= 2*S: resize to (W//2, H//2) with BOX resampling;
2. scale = S / min(W, H); resize to (round(W*scale), round(H*scale)) with BICUBIC (Python's round = banker's);
3. center crop S x S at offsets ((H-S)//2, (W-S)//2).

`to_rgb` turns any PIL mode into 8-bit RGB. Like the reference (`Image.convert('RGB')`) an alpha channel is
dropped (not composited). 16/32-bit integer images ("I;16", "I;16B", "I") are scaled to 8 bits with
round(v / 257) instead of PIL's clipping conversion; float images ("F") are assumed to be in [0, 255].

Decompression bombs: a small file can declare a huge image (a 680 KB PNG of 1 x 200,000 px), and the crop's
step 2 can blow a thin image up (1 x 200,000 at S=64 becomes 12,800,000 x 64 px, 2.4 GB). `ImageLimits` bounds
each side and the pixel count read from the header *before* decoding (`load_rgb`; PIL's `Image.open` is
lazy), and the pixel count of step 2 before resizing (`adm_center_crop`; also before decoding when `load_rgb`
is given the resolution). Every limit is an environment variable, so it reaches DataLoader workers and
needs no new flag; the error names the limit, its value and how to raise it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = ["to_rgb", "adm_center_crop", "adm_resize_size", "load_rgb", "check_resolution", "ImageLimits",
           "ImageTooLargeError", "check_image_size"]


class ImageTooLargeError(ValueError):
    """An image is over one of the `ImageLimits` (a likely decompression bomb); the message says which."""


@dataclass(frozen=True)
class ImageLimits:
    """Per-image resource bounds; `from_env()` reads the overrides (the names in `ENV`)."""

    max_side: int = 65_535                 # JPEG's own maximum; a longer side is almost surely a bomb
    max_pixels: int = 178_956_970          # W*H at decode: PIL's own error threshold (2 x MAX_IMAGE_PIXELS)
    # W*H after the crop's BICUBIC resize: 16.8 Mpx (about 170 MB peak; aspect 64:1 at --res 512)
    max_resized_pixels: int = 1 << 24
    max_bytes: int = 1 << 30               # file size read into memory
    read_timeout: float = 120.0            # seconds for open + read of one file (a stalled network mount)

    ENV = {"max_side": "REPA_MAX_IMAGE_SIDE", "max_pixels": "REPA_MAX_IMAGE_PIXELS",
           "max_resized_pixels": "REPA_MAX_RESIZED_PIXELS", "max_bytes": "REPA_MAX_IMAGE_BYTES",
           "read_timeout": "REPA_READ_TIMEOUT"}

    @classmethod
    def from_env(cls, env=None) -> "ImageLimits":
        env = os.environ if env is None else env
        kw = {}
        for f in dataclasses.fields(cls):
            raw = env.get(cls.ENV[f.name])
            if raw is None or raw == "":
                continue
            try:
                value = float(raw) if f.name == "read_timeout" else int(raw)
            except ValueError:
                value = None
            if value is None or value <= 0:
                raise ValueError(f"{cls.ENV[f.name]}={raw!r}: expected a positive "
                                 f"{'number of seconds' if f.name == 'read_timeout' else 'integer'}")
            kw[f.name] = value
        return cls(**kw)

    def refuse(self, what: str, limit: str, name: str | None, needed: int | None = None) -> ImageTooLargeError:
        """The error for `what` (e.g. 'image of 1 x 200000 px') over the limit field `limit`; `needed` is
        the value that would admit it (the suggested setting)."""
        var, value = self.ENV[limit], getattr(self, limit)
        where = f"{name}: " if name else ""
        return ImageTooLargeError(
            f"{where}{what} is over the limit {var}={value} (a guard against decompression bombs, which take "
            f"gigabytes to decode or resize); if the image is genuine, raise it, e.g. "
            f"{var}={max(needed or 0, value * 2)} repa-preprocess ..., or remove the file (or use --skip-bad)")


def check_resolution(res: int) -> int:
    """Validate a crop resolution: a positive multiple of 16 (the VAE downsamples by 8, SiT patches by 2)."""
    if int(res) != res or res <= 0 or res % 16:
        raise ValueError(f"--res must be a positive multiple of 16 (e.g. 256 or 512), got {res!r}")
    return int(res)


def adm_resize_size(size: tuple[int, int], res: int) -> tuple[int, int]:
    """(W, H) of the ADM crop's BICUBIC resize (step 2) for an image of `size`: pure arithmetic, no pixels."""
    w, h = size
    if res < 1:
        raise ValueError(f"crop size must be >= 1, got {res}")
    if min(w, h) < 1:
        raise ImageTooLargeError(f"empty image ({w} x {h} px)")
    while min(w, h) >= 2 * res:
        w, h = w // 2, h // 2
    scale = res / min(w, h)
    return round(w * scale), round(h * scale)


def check_image_size(size: tuple[int, int], limits: ImageLimits, res: int | None = None,
                     name: str | None = None) -> None:
    """Raise ImageTooLargeError if a (W, H) image is over a side or pixel limit (resize limit if `res`)."""
    w, h = size
    if max(w, h) > limits.max_side:
        raise limits.refuse(f"image of {w} x {h} px (side {max(w, h)})", "max_side", name, max(w, h))
    if w * h > limits.max_pixels:
        raise limits.refuse(f"image of {w} x {h} px ({w * h} px)", "max_pixels", name, w * h)
    if res is not None:
        _check_resized(size, res, limits, name)


def _check_resized(size: tuple[int, int], res: int, limits: ImageLimits, name: str | None) -> tuple[int, int]:
    """The ADM resize size of `size`, or ImageTooLargeError if it is over `limits.max_resized_pixels`."""
    rw, rh = adm_resize_size(size, res)
    if rw * rh > limits.max_resized_pixels:
        raise limits.refuse(f"image of {size[0]} x {size[1]} px, which the ADM crop at --res {res} resizes to "
                            f"{rw} x {rh} px ({rw * rh} px),", "max_resized_pixels", name, rw * rh)
    return rw, rh


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


def adm_center_crop(img: Image.Image, size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """ADM center crop of a PIL image to `size` x `size`; returns uint8 HWC (size, size, 3) RGB.

    Refuses (ImageTooLargeError) an image whose BICUBIC resize would be over `limits.max_resized_pixels`
    (default: `ImageLimits.from_env()`), before any resize allocates it."""
    limits = ImageLimits.from_env() if limits is None else limits
    rw, rh = _check_resized(img.size, size, limits, None)  # the caller names the image
    img = to_rgb(img)
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    img = img.resize((rw, rh), resample=Image.BICUBIC)  # (rw, rh): adm_resize_size mirrors the loop above
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size].copy()  # contiguous, writable


def _open_checked(fp, limits: ImageLimits, res: int | None, name: str | None) -> Image.Image:
    """Image.open (lazy: header only) + our size checks, with PIL's own global bomb check aligned to ours."""
    # PIL refuses > 2 x MAX_IMAGE_PIXELS on its own, which would make a raised REPA_MAX_IMAGE_PIXELS useless:
    # ours is the gate, so PIL's is only ever raised to it (process-wide, never lowered).
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours decides, with a clearer message
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:  # PIL's own check (> 2 x its limit) fired first
            n = re.search(r"\((\d+) pixels\)", str(e))
            raise limits.refuse(f"image of {n[1]} px" if n else f"image ({e})", "max_pixels", name,
                                int(n[1]) if n else None) from None
        except Image.UnidentifiedImageError:
            if name is None:
                raise
            # PIL names a file object by its repr: name the image instead
            raise Image.UnidentifiedImageError(f"cannot identify image file {name}") from None
    try:
        check_image_size(img.size, limits, res, name)
    except BaseException:
        img.close()
        raise
    return img


def load_rgb(fp, exif_transpose: bool = True, *, limits: ImageLimits | None = None, res: int | None = None,
             name: str | None = None) -> Image.Image:
    """Open an image file/path/file-like, check its header size against `limits` (default: from the
    environment; with `res`, also the ADM resize), fully decode it, apply its EXIF orientation, convert to RGB.
    `name` identifies the image in error messages."""
    limits = ImageLimits.from_env() if limits is None else limits
    with _open_checked(fp, limits, res, name) as img:
        img.load()
        out = ImageOps.exif_transpose(img) if exif_transpose else img
        out = to_rgb(out)
        return out.copy() if out is img else out  # never hand out the image the `with` closes
