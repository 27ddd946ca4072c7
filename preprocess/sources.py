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

Reading is bounded (see `read_file` and `repa.preprocess.crop.ImageLimits`): a file is opened without
waiting (a FIFO or socket named like an image is refused, not waited on), read in a helper thread that gives
up after REPA_READ_TIMEOUT seconds, and its header size is checked before decoding.

`Source.fingerprint()` is a small JSON-able dict that changes when the data change (folders: sorted relative
paths + sizes; HF datasets: the datasets fingerprint or the split size and data files), and
`diff_listings(old, new)` names the first differences between two folder listings (`ImageFolderSource.listing()`)
so a resumed run can say what changed under it.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import os
import re
import stat
import threading
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .crop import ImageLimits, adm_center_crop, load_rgb, to_rgb

__all__ = ["Source", "ImageFolderSource", "HFSource", "DigitsSource", "open_source", "SourceError",
           "image_extensions", "read_file", "diff_listings", "listing_sha256"]

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
    res: int | None = None       # the crop size: when set, decode refuses images whose ADM resize is too big
    limits: ImageLimits | None = None  # None: ImageLimits.from_env() at decode time

    def _limits(self) -> ImageLimits:
        return self.limits if self.limits is not None else ImageLimits.from_env()

    def _load(self, fp, name: str) -> Image.Image:
        """Decode with the size limits checked on the header first (and the ADM resize when `res` is set)."""
        return load_rgb(fp, self.exif_transpose, limits=self._limits(), res=self.res, name=name)

    def notes(self) -> list[str]:
        """Lines worth showing the user once when the source is opened (e.g. paths left out of a listing)."""
        return []

    def fingerprint(self) -> dict:
        """A small JSON-able dict identifying the data; equal dicts mean the same images under the same keys.
        Subclasses add content hashes; this base only has the kind, spec and size."""
        try:
            n = len(self)
        except Exception:  # noqa: BLE001 - a stream of unknown length
            n = None
        return {"kind": type(self).__name__, "spec": self.spec, "num_rows": n}

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

    def image(self, key: int, res: int) -> np.ndarray:
        """Image `key` exactly as repa-preprocess feeds it to the VAE and teachers: uint8 (res, res, 3) after
        the ADM crop (indexable sources; e.g. the real side of an FID reference batch)."""
        img, _, _ = self.decode(self.get(key))
        return adm_center_crop(img, res, self._limits())


def image_extensions() -> set[str]:
    """Lower-case file extensions PIL can open (the reference keeps files whose extension PIL knows)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


# ----------------------------------------------------------------------------------------------------------
# bounded reads

_KINDS = ((stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"),
          (stat.S_ISLNK, "symbolic link"))


def file_kind(mode: int) -> str:
    """'regular file', 'named pipe (FIFO)', 'socket', ... for an st_mode."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _not_regular(path: str, mode: int) -> SourceError:
    return SourceError(f"{path} is a {file_kind(mode)}, not a regular file, so it cannot hold an image "
                       "(reading a FIFO or socket would wait forever); remove it or rename it")


def _read_all(path: str, limits: ImageLimits, regular_only: bool) -> bytes:
    """open + size check + read to the end (runs in read_file's helper thread)."""
    if regular_only and not stat.S_ISREG(mode := os.stat(path).st_mode):  # a socket cannot even be opened
        raise _not_regular(path, mode)
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (fstat below rechecks the type)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if regular_only and not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, min(max(st.st_size + 1, 1 << 16), 1 << 24)):
            total += len(chunk)
            if total > limits.max_bytes:
                raise limits.refuse(f"file of more than {total} bytes", "max_bytes", path, total)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file(path: str, limits: ImageLimits | None = None, *, regular_only: bool = True) -> bytes:
    """The bytes of one image file, read with bounds: a file that is not a regular file is refused without
    opening it for a blocking read; the whole open + read runs in a helper thread and is abandoned (a
    SourceError naming the file) after `limits.read_timeout` seconds (REPA_READ_TIMEOUT, default 120), e.g.
    on a stalled network mount; more than `limits.max_bytes` is refused. `regular_only=False` also reads
    FIFOs and devices (the timeout still applies)."""
    limits = ImageLimits.from_env() if limits is None else limits
    box: dict[str, Any] = {}

    def work():
        try:
            box["data"] = _read_all(path, limits, regular_only)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    # a daemon thread: a read stuck in the kernel cannot be cancelled, only left behind
    t = threading.Thread(target=work, name="repa-read-file", daemon=True)
    t.start()
    t.join(limits.read_timeout)
    if t.is_alive():
        raise SourceError(f"{path}: no complete read after {limits.read_timeout:g} s (the limit "
                          f"{ImageLimits.ENV['read_timeout']}); a stalled network file system or a file that never "
                          f"ends. Check the mount, remove the file, or raise the limit, e.g. "
                          f"{ImageLimits.ENV['read_timeout']}={limits.read_timeout * 4:g} repa-preprocess ...")
    if "error" in box:
        raise box["error"]
    return box["data"]


# ----------------------------------------------------------------------------------------------------------
# folder listing: symlinks followed once, special files reported

class _Listing:
    """What a walk found: image files (sorted, each real file once), special files, repeats left out."""

    def __init__(self, root: str, exts: set[str]):
        self.root, self.exts = root, exts
        self.files: list[str] = []                  # regular files (and symlinks to unlisted regular files)
        self.special: list[tuple[str, str]] = []    # (path, kind) named like images but not regular files
        self.repeats: list[tuple[str, str]] = []    # (path left out, the path it repeats)
        self.links: list[str] = []                  # symlinks named like images, resolved after the walk
        self.ids: dict[tuple[int, int], str] = {}   # (st_dev, st_ino) of listed files -> path
        self.dirs: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of walked directories -> path

    def is_image(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.exts


def _scan(lst: _Listing, path: str, dev: int, linked_dirs: list) -> list[str]:
    """List one directory: record its files, return its real subdirectories, push symlinked ones."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"cannot list {path} ({type(e).__name__}: {e}); its images would be missing: "
                          "fix its permissions or remove it") from e
    subdirs = []
    for e in entries:
        if e.is_symlink():
            if os.path.isdir(e.path):
                heapq.heappush(linked_dirs, e.path)
            elif lst.is_image(e.name):
                lst.links.append(e.path)
        elif e.is_dir(follow_symlinks=False):
            subdirs.append(e.path)
        elif lst.is_image(e.name):
            if e.is_file(follow_symlinks=False):
                lst.files.append(e.path)
                lst.ids.setdefault((dev, e.inode()), e.path)
            else:
                lst.special.append((e.path, file_kind(e.stat(follow_symlinks=False).st_mode)))
    return subdirs


def _walk_real(lst: _Listing, top: str, linked_dirs: list) -> None:
    """Walk the real (non-symlink) tree under `top`; a directory seen before (by st_dev, st_ino) is skipped."""
    todo = [top]
    while todo:
        path = todo.pop()
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in lst.dirs:
            lst.repeats.append((path, lst.dirs[key]))
            continue
        lst.dirs[key] = path
        todo.extend(reversed(_scan(lst, path, st.st_dev, linked_dirs)))


def _resolve_links(lst: _Listing) -> None:
    """Symlinked files: listed unless they point at a file already listed (then a repeat) or are broken."""
    for path in sorted(lst.links):
        try:
            st = os.stat(path)
        except OSError as e:
            lst.special.append((path, f"broken symbolic link ({type(e).__name__})"))
            continue
        if not stat.S_ISREG(st.st_mode):
            lst.special.append((path, f"symbolic link to a {file_kind(st.st_mode)}"))
        elif (st.st_dev, st.st_ino) in lst.ids:
            lst.repeats.append((path, lst.ids[(st.st_dev, st.st_ino)]))
        else:
            lst.ids[(st.st_dev, st.st_ino)] = path
            lst.files.append(path)


def list_images(root: str, exts: set[str] | None = None) -> _Listing:
    """Walk `root` following symlinks, but each directory (by st_dev, st_ino) and each file at most once.

    The real tree is walked first, so a directory or file reached both directly and through a symlink is
    listed at its real path; a symlinked directory (e.g. `class/up -> ..`, a loop) whose target was already
    walked is left out, and so is a symlink to a file already listed; the others are followed in sorted path
    order. Left-out paths are in `.repeats`, images that are not regular files (FIFOs, sockets, devices,
    broken links) in `.special`. Hard links are separate names and each is listed."""
    lst = _Listing(root, image_extensions() if exts is None else exts)
    linked_dirs: list[str] = []
    _walk_real(lst, root, linked_dirs)
    while linked_dirs:
        _walk_real(lst, heapq.heappop(linked_dirs), linked_dirs)
    _resolve_links(lst)
    lst.files.sort()
    lst.special.sort()
    lst.repeats.sort()
    return lst


def path_listing(paths, root: str) -> list[list]:
    """[[path relative to `root` ('/'-separated), size in bytes], ...] in the order of `paths` (size -1: cannot
    be stat'ed): what a listing fingerprint hashes and a changed source is diffed against."""
    out = []
    for p in paths:
        try:
            size = os.stat(p).st_size
        except OSError:
            size = -1
        out.append([os.path.relpath(p, root).replace(os.sep, "/"), int(size)])
    return out


def listing_sha256(entries) -> str:
    """sha256 of a listing: one 'relative/path<TAB>size' line per (path, size) entry, in the given order."""
    h = hashlib.sha256()
    for rel, size in entries:
        h.update(os.fsencode(rel) + b"\t" + str(int(size)).encode() + b"\n")
    return h.hexdigest()


def diff_listings(old, new, limit: int = 10) -> list[str]:
    """Human-readable differences between two listings (sequences of (relative path, size), in key order,
    e.g. `ImageFolderSource.listing()` now and as stored by an earlier run): [] if they are equal, else a
    summary line (counts, and the first key whose image differs: every later key may hold another image)
    followed by at most `limit` 'added'/'removed'/'size changed' lines in path order."""
    old = [(str(p), int(s)) for p, s in old]
    new = [(str(p), int(s)) for p, s in new]
    if old == new:
        return []
    a, b = dict(old), dict(new)
    lines = [(p, f"added {p} ({b[p]} bytes)") for p in b.keys() - a.keys()]
    lines += [(p, f"removed {p} ({a[p]} bytes)") for p in a.keys() - b.keys()]
    lines += [(p, f"size changed {p}: {a[p]} -> {b[p]} bytes") for p in a.keys() & b.keys() if a[p] != b[p]]
    first = next((i for i, (x, y) in enumerate(zip(old, new)) if x != y), min(len(old), len(new)))
    n_add, n_rem = len(b.keys() - a.keys()), len(a.keys() - b.keys())
    summary = (f"{n_add} added, {n_rem} removed, {len(lines) - n_add - n_rem} changed in size "
               f"({len(old)} -> {len(new)} files); the first difference is at key {first}")
    return [summary] + [text for _, text in sorted(lines)[:limit]]


class ImageFolderSource(Source):
    """`root/<class>/**/<image>`: labels = index of the top-level directory in the sorted class names.

    The listing follows symlinks once (`list_images`). Files named like images that are not regular files
    (FIFOs, sockets, devices, broken links) are refused here, before any work, unless `skip_bad`: then they
    keep their key and `decode` raises for them, so the pipeline skips and reports them."""

    def __init__(self, root: str, spec: str, name: str, class_pattern: str | None = None,
                 skip_bad: bool = False):
        self.spec, self.name = spec, name
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise SourceError(f"{spec}: image directory {self.root!r} does not exist; "
                              "pass an existing folder with one subfolder per class")
        lst = list_images(self.root)
        if lst.special and not skip_bad:
            (p, kind), more = lst.special[0], len(lst.special) - 1
            raise SourceError(f"{spec}: {p} is a {kind}, not a regular image file"
                              f"{f' (and {more} more such files)' if more else ''}; reading it could block "
                              "forever. Remove it, or rerun with --skip-bad to skip and report such files")
        self.special, self.repeats = dict(lst.special), lst.repeats
        paths = sorted(lst.files + list(self.special))
        self._set_labels(paths, class_pattern)
        self._listing = None

    def _set_labels(self, paths: list[str], class_pattern: str | None) -> None:
        spec = self.spec
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
        if path in self.special:  # listed only with skip_bad: reported, never opened
            raise SourceError(f"{path} is a {self.special[path]}, not a regular image file")
        return self._load(io.BytesIO(read_file(path, self._limits())), path), label, path

    def describe(self, key: int) -> str:
        return self.paths[key]

    def notes(self) -> list[str]:
        out = []
        if self.repeats:
            (p, first), more = self.repeats[0], len(self.repeats) - 1
            out.append(f"{self.spec}: {len(self.repeats)} symlinked path(s) repeat folders or files already "
                       f"listed and are left out (e.g. {p} -> {first}{f', and {more} more' if more else ''})")
        if self.special:
            p, kind = next(iter(sorted(self.special.items())))
            out.append(f"{self.spec}: {len(self.special)} file(s) named like images are not regular files and "
                       f"will be skipped (e.g. {p}: {kind})")
        return out

    def listing(self) -> list[list]:
        """[[relative path ('/'-separated), size in bytes], ...] in key order (size -1: cannot be stat'ed).
        Stats every file once (cached): call it once per run, e.g. through fingerprint()."""
        if self._listing is None:
            self._listing = path_listing(self.paths, self.root)
        return self._listing

    def fingerprint(self) -> dict:
        """{"kind", "num_rows", "classes", "bytes", "sha256"}: sha256 = `listing_sha256(self.listing())`.
        The root path is left out: the same tree copied elsewhere has the same fingerprint."""
        lst = self.listing()
        return {"kind": "imagefolder", "num_rows": len(lst), "classes": self.num_classes,
                "bytes": sum(max(0, s) for _, s in lst), "sha256": listing_sha256(lst)}


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

    def fingerprint(self) -> dict:
        """{"kind", "num_rows", "sha256" of the pixels and labels} (a new scikit-learn could change them)."""
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return {"kind": "digits", "num_rows": len(self), "sha256": h.hexdigest()}


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
        # identity of the data, taken before our casts: map-style datasets have a fingerprint; a stream only
        # has its data files (private attribute, best effort; hub names carry the revision)
        self._ds_fingerprint = getattr(ds, "_fingerprint", None)
        self._data_files = (getattr(getattr(ds, "_ex_iterable", None), "kwargs", None) or {}).get("files")
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
                pil = self._load(io.BytesIO(img["bytes"]), name)
            elif img.get("path"):
                pil = self._load(io.BytesIO(read_file(img["path"], self._limits())), f"{name} ({img['path']})")
            else:
                raise SourceError(f"{name}: empty image entry")
        elif isinstance(img, Image.Image):
            pil = to_rgb(img)
        elif isinstance(img, (bytes, bytearray)):
            pil = self._load(io.BytesIO(img), name)
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

    def fingerprint(self) -> dict:
        """{"kind", "dataset", "split", "streaming", "num_rows", "config", "version", "num_bytes", and
        "datasets_fingerprint" (map-style: the `datasets` library's fingerprint of the loaded split, which
        changes when its data files change) or, for streams, "data_files": sha256 of the stream's data file
        names (hub names carry the revision)}. Local paths are left out where the library allows."""
        info = getattr(self.ds, "info", None)
        split_info = (getattr(info, "splits", None) or {}).get(self.split)
        out = {"kind": "hf", "dataset": self.dataset, "split": self.split, "streaming": not self.indexable,
               "num_rows": self._len, "config": getattr(info, "config_name", None),
               "version": str(getattr(info, "version", None)),
               "num_bytes": getattr(split_info, "num_bytes", None)}
        if self.indexable:
            out["datasets_fingerprint"] = self._ds_fingerprint
        else:
            files = self._data_files
            out["data_files"] = (hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()
                                 if isinstance(files, (list, tuple)) else None)
        return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "source"


def open_source(spec: str, *, data_dir: str | None = None, split: str = "train",
                image_column: str | None = None, label_column: str | None = None,
                streaming: bool | None = None, num_classes: int | None = None, skip_bad: bool = False,
                res: int | None = None) -> Source:
    """Open the source named by repa-preprocess's first argument (see module docstring).

    `skip_bad`: folder images that are not regular files are kept (decode reports them) instead of refused
    at once; `res`: the crop size, so that decode checks the ADM resize size before decoding."""
    source = _open(spec, data_dir=data_dir, split=split, image_column=image_column, label_column=label_column,
                   streaming=streaming, num_classes=num_classes, skip_bad=skip_bad)
    source.res = res
    return source


def _open(spec: str, *, data_dir, split, image_column, label_column, streaming, num_classes,
          skip_bad) -> Source:
    if spec == "digits":
        return DigitsSource()
    if spec == "imagenet":
        if data_dir:
            return ImageFolderSource(data_dir, spec, "imagenet", class_pattern=r"n\d{8}", skip_bad=skip_bad)
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
        return ImageFolderSource(path, spec, "imagefolder-" + _safe(os.path.basename(os.path.normpath(path))),
                                 skip_bad=skip_bad)
    if spec.startswith("hf:"):
        name = spec[3:]
        if not name:
            raise SourceError("hf: needs a dataset name, e.g. hf:uoft-cs/cifar10")
        return HFSource(name, spec, "hf-" + _safe(name), split=split, image_column=image_column,
                        label_column=label_column, streaming=bool(streaming), num_classes=num_classes,
                        hint=" (a local dataset directory also works: hf:/path/to/dir)")
    raise SourceError(f"unknown source {spec!r}; use one of imagenet, cifar10, cifar100, digits, "
                      "imagefolder:PATH, hf:NAME")
