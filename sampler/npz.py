"""Image files of a sampling run: atomic PNGs, the ADM-compatible ``.npz`` and a preview grid.

The ``.npz`` is what the ADM evaluator (and ``repa-eval``) reads: key ``arr_0`` = uint8 (N, H, W, 3) NHWC,
plus, like ADM's own sampler, ``arr_1`` = int64 (N,) class labels. It is written *streaming* (one image at a
time straight into an uncompressed zip member, as ``np.savez`` lays it out), so 50K 512 px images never sit in
memory at once, with fixed zip timestamps so the same images always give the same bytes. All writes go to a
temporary file in the destination folder followed by ``os.replace``.
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from repa.shards import storage
from repa.trainer.metrics import save_png  # the one PNG writer (atomic); re-exported for the sampler

__all__ = ["save_png", "read_png", "write_images_npz", "load_images_npz", "make_grid", "atomic_write_bytes",
           "is_temp_name",
           "temp_path"]

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def temp_path(path: str, pid: int | None = None) -> str:
    """Where ``path`` is written before the rename: the shards' own temp name (``.<name>.repa-tmp-<pid>-<hex>``)
    in the same folder."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, storage.temp_name(name, pid))


def is_temp_name(name: str, of: str | None = None) -> bool:
    """True for a file name made by :func:`temp_path` (a write in progress, or left by a killed process).

    ``of``: only temp files of that final name. The pattern is anchored at both ends and carries the
    ``repa-tmp`` mark, so no ordinary user file (``thesis.tmp-2.docx``, ``.bashrc.tmp3``) matches.
    """
    target = storage.temp_target(name)
    return target is not None and (of is None or target[0] == of)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary file, fsync and rename (``repa.shards.storage.atomic_write``)."""
    storage.atomic_write(path, data)


def read_png(path: str) -> np.ndarray:
    """Read a PNG as uint8 (H, W, 3) RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks: Iterable[np.ndarray]) -> None:
    info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    written = 0
    with zf.open(info, mode="w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(chunk.tobytes())
            written += chunk.nbytes
    if written != expected:
        raise RuntimeError(f"npz member {name}: wrote {written} bytes, expected {expected} for shape {shape}")


def write_images_npz(path: str, num: int, image_shape: tuple[int, int, int],
                     get_image: Callable[[int], np.ndarray], labels: np.ndarray | None = None,
                     progress: Callable[[Iterable], Iterable] | None = None) -> str:
    """Write ``arr_0`` = uint8 (num, H, W, 3) from ``get_image(i)`` for i in 0..num-1 (+ ``arr_1`` labels).

    ``path`` must end in ``.npz``. Returns ``path``. ``get_image`` results must have ``image_shape``.
    """
    if not path.endswith(".npz"):
        raise ValueError(f"npz path must end with .npz: {path}")
    indices = range(num)
    if progress is not None:
        indices = progress(indices)

    def images():
        for i in indices:
            img = get_image(i)
            if img.shape != tuple(image_shape) or img.dtype != np.uint8:
                raise ValueError(f"image {i} has shape {img.shape} dtype {img.dtype}; expected "
                                 f"{tuple(image_shape)} uint8 (remove stale files from the sample folder)")
            yield img

    tmp = temp_path(path)
    try:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_member(zf, "arr_0", (num, *image_shape), np.uint8, images())
            if labels is not None:
                labels = np.asarray(labels, dtype=np.int64)
                _write_member(zf, "arr_1", labels.shape, np.int64, [labels])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_images_npz(path: str, key: str = "arr_0", mmap: bool = True) -> np.ndarray:
    """Load and validate the uint8 NHWC image array of an ADM-style ``.npz`` (no pickles allowed).

    Returns a read-only array; for uncompressed npz files it is memory-mapped from the zip when possible.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .npz file")
    arr = _mmap_member(path, key) if mmap else None
    if arr is None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                files = npz.files
                arr = npz[key] if key in files else None
        except (ValueError, zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        if arr is None:
            raise KeyError(f"{path}: has no key {key!r} (keys: {files}); an ADM-style sample/reference batch "
                           f"stores images as uint8 NHWC under 'arr_0'")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}[{key!r}]: expected uint8 images of shape (N, H, W, 3), got {arr.dtype} "
                         f"{arr.shape}")
    return arr


def _mmap_member(path: str, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed ``key.npy`` member of a zip; None if not possible (compressed, missing)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    return None
                header_len = f.tell()
        if fortran or dtype.hasobject:
            return None
        with open(path, "rb") as raw:  # data offset = local header + name + extra + npy header
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
        offset = info.header_offset + 30 + name_len + extra_len + header_len
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError):
        return None


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image."""
    n, h, w, c = images.shape
    cols = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
    return grid
