"""Image sources for repa-preprocess: where the images and labels come from, with a stable global index.

Every source maps a *global index* (the record key in the shards) to one image and its label:

- indexable sources (`ImageFolderSource`, `HFSource` in map mode, `DigitsSource`) have `len()` and
  `get(key)`; folder listings are sorted by full path and labels are the index of the top-level directory
  name in the sorted set of names (docs/reference.md §5.1), so the index is stable across runs and machines;
- streaming sources (`HFSource` with streaming=True, e.g. ImageNet from the HF hub without `--data-dir`)
  only have `stream(start)`; the global index is the position in the stream and resuming uses `.skip()`.

Both return *records* that `decode(record)` turns into `(PIL RGB image, label, name)`. `get`/`stream` are
cheap; `decode` does the expensive work and runs in DataLoader workers. `name` identifies the image in
error messages (a file path, or `hf:<dataset>[<split>]#<index>`).

`open_source(spec, ...)` parses the first positional argument of repa-preprocess:
`imagenet`, `cifar10`, `cifar100`, `digits`, `imagefolder:PATH`, `hf:NAME`.
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .crop import load_rgb, to_rgb

__all__ = ["Source", "ImageFolderSource", "HFSource", "DigitsSource", "open_source", "SourceError",
           "image_extensions"]

IMAGENET_HF = "ILSVRC/imagenet-1k"
CIFAR_HF = {"cifar10": ("uoft-cs/cifar10", "img", "label"),
            "cifar100": ("uoft-cs/cifar100", "img", "fine_label")}


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message says which and what to do."""


class Source:
    """Base class. Subclasses set `spec`, `name`, `num_classes`, `indexable` and implement the methods."""

    spec: str            # as given on the command line, recorded in the manifest provenance
    name: str            # short file-system-safe name, used for the default --out
    num_classes: int
    indexable: bool = True
    exif_transpose: bool = True  # apply the EXIF orientation when decoding files

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, key: int) -> Any:
        """Cheap raw record for global index `key` (indexable sources only)."""
        raise NotImplementedError

    def stream(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """Yield (global index, raw record) from position `start` on (all sources)."""
        for key in range(start, len(self)):
            yield key, self.get(key)

    def decode(self, record: Any) -> tuple[Image.Image, int, str]:
        """Raw record -> (RGB PIL image, label, name). May raise on corrupt data."""
        raise NotImplementedError

    def describe(self, key: int) -> str:
        """Name of the image with global index `key` for error messages (must not fail)."""
        return f"{self.spec}#{key}"


def image_extensions() -> set[str]:
    """Lower-case file extensions PIL can open (the reference keeps files whose extension PIL knows)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


class ImageFolderSource(Source):
    """`root/<class>/**/<image>`: labels = index of the top-level directory in the sorted class names."""

    def __init__(self, root: str, spec: str, name: str, class_pattern: str | None = None):
        self.spec, self.name = spec, name
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise SourceError(f"{spec}: image directory {self.root!r} does not exist; "
                              "pass an existing folder with one subfolder per class")
        exts = image_extensions()
        paths = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for fn in filenames:
                if os.path.splitext(fn)[1].lower() in exts:
                    paths.append(os.path.join(dirpath, fn))
        paths.sort()
        if not paths:
            raise SourceError(f"{spec}: no image files found under {self.root!r}")
        rel_top = [os.path.relpath(p, self.root).split(os.sep)[0] for p in paths]
        loose = [p for p, top in zip(paths, rel_top) if os.path.join(self.root, top) == p]
        if loose:
            raise SourceError(f"{spec}: {len(loose)} image(s) directly in {self.root!r} (e.g. {loose[0]!r}) "
                              "have no class; put every image in a subfolder named after its class")
        self.classes = sorted(set(rel_top))
        if class_pattern is not None:
            bad = [c for c in self.classes if not re.fullmatch(class_pattern, c)]
            if bad:
                raise SourceError(f"{spec}: {self.root!r} has subfolders that are not class folders "
                                  f"(e.g. {bad[0]!r}); point --data-dir at the ILSVRC-2012 *train* directory "
                                  "that holds the nXXXXXXXX synset folders")
        index = {c: i for i, c in enumerate(self.classes)}
        self.paths = paths
        self.labels = np.asarray([index[t] for t in rel_top], dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, key: int) -> tuple[str, int]:
        return self.paths[key], int(self.labels[key])

    def decode(self, record):
        path, label = record
        return load_rgb(path, self.exif_transpose), label, path

    def describe(self, key: int) -> str:
        return self.paths[key]


class DigitsSource(Source):
    """The embedded offline dataset: scikit-learn's bundled 1,797 8x8 handwritten digits (10 classes).

    Pixel values 0..16 are scaled to 0..255 with np.rint(v * 255 / 16) and the grey image is repeated to RGB.
    No network access: the data ship inside scikit-learn.
    """

    spec = name = "digits"
    num_classes = 10

    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SourceError("source 'digits' needs scikit-learn: pip install 'repa[demo]' "
                              "(or pip install scikit-learn)") from e
        d = load_digits()
        self.images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.labels = d.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, key: int):
        return key, self.images[key], int(self.labels[key])

    def decode(self, record):
        key, arr, label = record
        return Image.fromarray(arr, mode="L").convert("RGB"), label, f"digits#{key}"


class HFSource(Source):
    """A Hugging Face `datasets` image-classification dataset, map-style (indexable) or streaming."""

    def __init__(self, dataset: str, spec: str, name: str, *, split: str = "train",
                 image_column: str | None = None, label_column: str | None = None,
                 streaming: bool = False, num_classes: int | None = None, hint: str = ""):
        self.spec, self.name, self.dataset, self.split = spec, name, dataset, split
        self.indexable = not streaming
        try:
            import datasets
        except ImportError as e:  # pragma: no cover
            raise SourceError(f"{spec} needs the `datasets` package: pip install datasets") from e
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - any hub/network/auth failure gets the same advice
            raise SourceError(
                f"could not open the Hugging Face dataset {dataset!r} (split {split!r}) for {spec}: "
                f"{type(e).__name__}: {e}\nWays out: `huggingface-cli login` (gated datasets such as "
                f"{IMAGENET_HF} need an accepted licence and a token); HF_HUB_OFFLINE=1 with a filled "
                f"local cache; or a local copy{hint}.") from e
        features = ds.features
        if features is None and streaming:
            ds = ds._resolve_features()
            features = ds.features
        cols = list(features or {})
        self.image_column = image_column or next((c for c in ("image", "img") if c in cols), None)
        self.label_column = label_column or next(
            (c for c in ("label", "fine_label", "labels") if c in cols), None)
        for flag, col in (("--image-column", self.image_column), ("--label-column", self.label_column)):
            if col is None or col not in cols:
                raise SourceError(f"{spec}: column {col!r} not found in {dataset!r} (columns: {cols}); "
                                  f"pass {flag}")
        if isinstance(features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # decode in our workers
        ds = ds.select_columns([self.image_column, self.label_column])
        self.ds = ds
        label_feat = features[self.label_column]
        if num_classes is not None:
            self.num_classes = int(num_classes)
        elif isinstance(label_feat, datasets.ClassLabel):
            self.num_classes = int(label_feat.num_classes)
        elif not streaming:
            self.num_classes = int(max(ds[self.label_column])) + 1
        else:
            raise SourceError(f"{spec}: the label column {self.label_column!r} is not a ClassLabel, so the "
                              "number of classes of the stream is unknown; pass --num-classes")
        self._len = None
        if not streaming:
            self._len = len(ds)
        else:
            info = getattr(ds, "info", None)
            splits = getattr(info, "splits", None) or {}
            if split in splits and splits[split].num_examples:
                self._len = int(splits[split].num_examples)

    def __len__(self) -> int:
        if self._len is None:
            raise SourceError(f"{self.spec}: the stream does not say how many images it holds; pass --limit N")
        return self._len

    def get(self, key: int):
        row = self.ds[int(key)]
        return key, row[self.image_column], row[self.label_column]

    def stream(self, start: int = 0):
        if self.indexable:
            yield from super().stream(start)
            return
        ds = self.ds.skip(start) if start else self.ds
        for key, row in enumerate(ds, start):
            yield key, (key, row[self.image_column], row[self.label_column])

    def decode(self, record):
        key, img, label = record
        name = self.describe(key)
        if isinstance(img, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            if img.get("bytes") is not None:
                pil = load_rgb(io.BytesIO(img["bytes"]), self.exif_transpose)
            elif img.get("path"):
                pil = load_rgb(img["path"], self.exif_transpose)
            else:
                raise SourceError(f"{name}: empty image entry")
        elif isinstance(img, Image.Image):
            pil = to_rgb(img)
        elif isinstance(img, (bytes, bytearray)):
            pil = load_rgb(io.BytesIO(img), self.exif_transpose)
        else:
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                raise SourceError(f"{name}: image column holds {arr.dtype} arrays; expected uint8 images")
            pil = to_rgb(Image.fromarray(arr))
        if label is None or int(label) < 0:
            raise SourceError(f"{name}: missing label ({label!r}); use a labelled split (--split)")
        return pil, int(label), name

    def describe(self, key: int) -> str:
        return f"hf:{self.dataset}[{self.split}]#{key}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "source"


def open_source(spec: str, *, data_dir: str | None = None, split: str = "train",
                image_column: str | None = None, label_column: str | None = None,
                streaming: bool | None = None, num_classes: int | None = None) -> Source:
    """Open the source named by repa-preprocess's first argument (see module docstring)."""
    if spec == "digits":
        return DigitsSource()
    if spec == "imagenet":
        if data_dir:
            return ImageFolderSource(data_dir, spec, "imagenet", class_pattern=r"n\d{8}")
        return HFSource(IMAGENET_HF, spec, "imagenet", split=split, image_column=image_column,
                        label_column=label_column, streaming=True if streaming is None else streaming,
                        num_classes=num_classes,
                        hint=" of the ILSVRC-2012 train folder given with --data-dir")
    if spec in CIFAR_HF:
        repo, icol, lcol = CIFAR_HF[spec]
        return HFSource(repo, spec, spec, split=split, image_column=image_column or icol,
                        label_column=label_column or lcol, streaming=bool(streaming), num_classes=num_classes)
    if spec.startswith("imagefolder:"):
        path = spec[len("imagefolder:"):]
        if not path:
            raise SourceError("imagefolder: needs a path, e.g. imagefolder:/data/my_images")
        return ImageFolderSource(path, spec, "imagefolder-" + _safe(os.path.basename(os.path.normpath(path))))
    if spec.startswith("hf:"):
        name = spec[3:]
        if not name:
            raise SourceError("hf: needs a dataset name, e.g. hf:uoft-cs/cifar10")
        return HFSource(name, spec, "hf-" + _safe(name), split=split, image_column=image_column,
                        label_column=label_column, streaming=bool(streaming), num_classes=num_classes,
                        hint=" (a local dataset directory also works: hf:/path/to/dir)")
    raise SourceError(f"unknown source {spec!r}; use one of imagenet, cifar10, cifar100, digits, "
                      "imagefolder:PATH, hf:NAME")
