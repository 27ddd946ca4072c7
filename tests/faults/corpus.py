"""A hidden-corner image corpus: the files real datasets contain and naive loaders crash on."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> expected outcome: "ok" (converted to RGB) or "bad" (reported with its path)
EXPECTED = {
    "zero_bytes.jpg": "bad",
    "truncated.jpg": "bad",
    "truncated.png": "bad",
    "not_an_image.jpg": "bad",
    "huge_20000.png": "bad",
    "thin_1x200000.png": "bad",
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "palette_alpha.png": "ok",
    "rgba.png": "ok",
    "gray.jpg": "ok",
    "one_pixel.png": "ok",
    "exif_rotated.jpg": "ok",
}


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int, height: int, value: int, rows_per_block: int = 500) -> bytes:
    """A valid 8-bit greyscale PNG of one colour, built without materialising the image (PIL needs ~10 s and
    400 MB for 20000 x 20000): ``rows_per_block`` identical rows are deflated once and ended with a full flush,
    which resets the compressor, so the same compressed bytes can be repeated for every block."""
    assert height % rows_per_block == 0
    block = (b"\0" + bytes([value]) * width) * rows_per_block  # filter byte 0 + pixels, per row
    c = zlib.compressobj(6)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    n = height // rows_per_block
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(block, adler)
    body = first + first[2:] * (n - 1) + b"\x03\x00" + struct.pack(">I", adler)  # + empty final block
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def write_corpus(root: Path, class_name: str = "c0") -> dict[str, Path]:
    """Write every corner case into ``root/class_name/`` and return name -> path."""
    d = Path(root) / class_name
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    files["zero_bytes.jpg"] = b""
    jpg = _bytes(Image.fromarray(_rgb(64, 80, 1)), "JPEG", quality=90)
    files["truncated.jpg"] = jpg[: len(jpg) // 3]
    png = _bytes(Image.fromarray(_rgb(64, 80, 2)), "PNG")
    files["truncated.png"] = png[: len(png) // 2]
    files["not_an_image.jpg"] = b"this is a text file with an image extension\n" * 10
    # 20000 x 20000 (400 Mpx) single-colour PNG: small on disk, 1.2 GB decoded.
    files["huge_20000.png"] = huge_png(20000, 20000, 7)
    # 1 x 200,000 px (680 KB): decodes to 600 KB, but the ADM crop's resize to --res 64 made it 2.4 GB
    files["thin_1x200000.png"] = huge_png(1, 200_000, 9)
    files["cmyk.jpg"] = _bytes(Image.fromarray(_rgb(48, 40, 3)).convert("CMYK"), "JPEG")
    g16 = (np.arange(40 * 36, dtype=np.uint16).reshape(40, 36) * 40).astype(np.uint16)
    files["gray16.png"] = _bytes(Image.fromarray(g16), "PNG")
    pal = Image.fromarray(_rgb(30, 30, 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    files["palette_alpha.png"] = _bytes(pal, "PNG", transparency=0)
    files["rgba.png"] = _bytes(Image.fromarray(np.dstack([_rgb(33, 47, 5), np.full((33, 47), 128, np.uint8)]), "RGBA"), "PNG")
    files["gray.jpg"] = _bytes(Image.fromarray(_rgb(50, 50, 6)[..., 0]), "JPEG")
    files["one_pixel.png"] = _bytes(Image.fromarray(_rgb(1, 1, 7)), "PNG")
    ex = Image.fromarray(_rgb(40, 60, 8))
    exif = ex.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    files["exif_rotated.jpg"] = _bytes(ex, "JPEG", exif=exif.tobytes())
    out = {}
    for name, data in files.items():
        p = d / name
        p.write_bytes(data)
        out[name] = p
    return out
