"""Captioned image sources and the text stage of repa-preprocess (text-to-image, docs/t2i.md).

Sources (the first argument of repa-preprocess):

* ``coco:DIR``: an MS-COCO folder, ``DIR/<split>/`` images + ``DIR/annotations/captions_<split>.json``
  (``--split train2014`` / ``val2014``; ``train``/``val`` pick the one matching annotation file). Records
  are the annotated images sorted by image id (U-ViT's order), captions in annotation order.
* ``captions:DIR``: any image folder + ``DIR/captions.jsonl``, one ``{"file": relpath, "captions": [...]}``
  per line; records sorted by ``file``.
* ``hf:NAME --caption-column COL``: a Hugging Face dataset whose column holds a caption or a list of them.

Every image must have at least one caption and every caption entry an image; anything else is refused
before work starts, naming the file. Per record the text stage stores ``text.<k>`` (k < ``--max-captions``,
(77, hidden) with the feature codec; unused slots hold the empty-caption encoding) and ``num_captions``
(how many slots are real). Next to the shards: ``captions.json`` (every caption string of every record
key, including any beyond ``--max-captions``) and ``empty_context.safetensors`` (the encoding of "", the
CFG null context), both written atomically before the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re

import numpy as np
import torch

from repa.shards import records as R
from repa.shards import storage
from repa.shards.schema import FieldSpec, feature_spec

from .crop import to_rgb
from .sources import Source, SourceError, list_images, listing_sha256, path_listing, read_file
from .text_encoder import load_text_encoder

__all__ = ["CaptionedSource", "COCOSource", "CaptionsFolderSource", "HFCaptionSource", "TextStage",
           "open_text_stage", "open_captioned_source", "text_stage_for", "is_captioned_spec", "uvit_center_crop",
           "CAPTIONS_FILE", "EMPTY_CONTEXT_FILE"]

CAPTIONS_FILE = "captions.json"
EMPTY_CONTEXT_FILE = "empty_context.safetensors"
DEFAULT_MAX_CAPTIONS = 5  # MS-COCO has 5 (a few images 6-7) captions per image


class CaptionedSource(Source):
    """An indexable source whose records carry captions; labels are all 0 (one class)."""

    num_classes = 1
    paths: list[str]
    caps: list[list[str]]

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, key: int):
        return self.paths[key]

    def captions(self, key: int) -> list[str]:
        return self.caps[key]

    crop: str = "adm"  # "uvit": U-ViT's crop here, so the pipeline's ADM crop of a res x res image is the identity

    def decode(self, record):
        # bounded read (special files refused, stalled reads time out), then the header size limits
        data = io.BytesIO(read_file(record, self._limits()))
        return self._crop(self._load(data, record)), 0, record

    def _crop(self, img):
        if self.crop != "uvit":
            return img
        from PIL import Image
        if not self.res:
            raise SourceError(f"{self.spec}: the uvit crop needs the crop size (set source.res)")
        return Image.fromarray(uvit_center_crop(img, self.res))

    def describe(self, key: int) -> str:
        return self.paths[key]

    def listing(self) -> list[list]:
        """[[path relative to the image root, size in bytes], ...] in key order (size -1: cannot be stat'ed)."""
        if getattr(self, "_listing", None) is None:
            self._listing = path_listing(self.paths, self.image_root)
        return self._listing

    def fingerprint(self) -> dict:
        """Equal iff the same images under the same keys with the same captions (a rerun with edited
        captions is refused like one with changed images)."""
        lst = self.listing()
        return {"kind": type(self).__name__, "num_rows": len(lst), "bytes": sum(max(0, s) for _, s in lst),
                "sha256": listing_sha256(lst), "captions_sha256": _captions_sha256(self.caps)}


def uvit_center_crop(img, size: int) -> np.ndarray:
    """U-ViT's MS-COCO crop (its datasets.center_crop): the central min-side square of the original (offsets
    rounded down), then one Lanczos resize to size x size. uint8 (size, size, 3)."""
    from PIL import Image
    arr = np.asarray(to_rgb(img))
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(np.ascontiguousarray(arr[top: top + side, left: left + side]))
    return np.asarray(square.resize((size, size), Image.LANCZOS), dtype=np.uint8)


def _captions_sha256(caps: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(caps, ensure_ascii=False).encode()).hexdigest()


def _check_captions(spec: str, where: str, names: list[str], caps: list[list[str]]) -> None:
    for name, cs in zip(names, caps):
        if not cs or not all(isinstance(c, str) for c in cs):
            raise SourceError(f"{spec}: {where} gives image {name!r} no caption strings ({cs!r}); every image "
                              "needs at least one caption: add them or remove the image")


def _image_files(root: str) -> set[str]:
    """Image files under ``root`` as relative paths: the image-folder walk (each directory and file once, so a
    symlink loop cannot repeat images), plus files named like images that are not regular files (refused at
    read time, naming them)."""
    lst = list_images(root)
    paths = list(lst.files) + [p for p, _ in lst.special]
    return {os.path.relpath(os.path.join(root, p), root).replace(os.sep, "/") for p in paths}


def _match_files(spec: str, root: str, listed: list[str], where: str) -> None:
    """Every listed image exists, and every image file under ``root`` is listed (nothing silently dropped)."""
    on_disk = _image_files(root)
    missing = [f for f in listed if f not in on_disk]
    if missing:
        raise SourceError(f"{spec}: {len(missing)} captioned image(s) listed in {where} are not in {root} "
                          f"(e.g. {missing[0]!r}); restore the files or remove their entries")
    extra = sorted(on_disk - set(listed))
    if extra:
        raise SourceError(f"{spec}: {len(extra)} image(s) in {root} have no captions in {where} (e.g. "
                          f"{extra[0]!r}); add captions for them or move them out of the folder")


class COCOSource(CaptionedSource):
    """MS-COCO captions: ``root/<split>/*.jpg`` + ``root/annotations/captions_<split>.json``."""

    def __init__(self, root: str, spec: str, split: str = "train"):
        self.spec = spec
        self.root = os.path.abspath(os.path.expanduser(root))
        self.split = _coco_split(spec, self.root, split)
        self.name = f"coco-{self.split}"
        ann_path = os.path.join(self.root, "annotations", f"captions_{self.split}.json")
        try:
            with open(ann_path, "rb") as f:
                ann = json.load(f)
            images, anns = ann["images"], ann["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{spec}: {ann_path} is not a COCO captions file ({type(e).__name__}: {e}); "
                              "it needs 'images' and 'annotations' lists") from e
        by_id = {int(im["id"]): im["file_name"] for im in images}
        caps: dict[int, list[str]] = {i: [] for i in by_id}
        for a in anns:
            if int(a["image_id"]) not in caps:
                raise SourceError(f"{spec}: {ann_path}: caption {a.get('id')} refers to image id "
                                  f"{a['image_id']}, which is not in its 'images' list")
            caps[int(a["image_id"])].append(a["caption"])
        ids = sorted(by_id)
        self.image_ids = ids
        self.files = [by_id[i] for i in ids]
        img_dir = os.path.join(self.root, self.split)
        if not os.path.isdir(img_dir):
            raise SourceError(f"{spec}: image folder {img_dir} does not exist (COCO layout: DIR/{self.split}/ "
                              f"next to DIR/annotations/captions_{self.split}.json)")
        _check_captions(spec, ann_path, self.files, [caps[i] for i in ids])
        _match_files(spec, img_dir, self.files, ann_path)
        self.image_root = img_dir
        self.paths = [os.path.join(img_dir, f) for f in self.files]
        self.caps = [[c.strip() for c in caps[i]] for i in ids]


def _coco_split(spec: str, root: str, split: str) -> str:
    ann_dir = os.path.join(root, "annotations")
    if os.path.isfile(os.path.join(ann_dir, f"captions_{split}.json")):
        return split
    have = sorted(re.findall(r"captions_(.+)\.json", " ".join(os.listdir(ann_dir)))) if os.path.isdir(ann_dir) else []
    year = [s for s in have if re.fullmatch(rf"{re.escape(split)}\d{{4}}", s)]
    if len(year) == 1:
        return year[0]
    raise SourceError(f"{spec}: annotation file {os.path.join(ann_dir, f'captions_{split}.json')} not found "
                      f"(found: {have or 'none'}); pass --split with one of them, or download the COCO "
                      "captions annotations (annotations_trainval2014.zip) into DIR/annotations/")


class CaptionsFolderSource(CaptionedSource):
    """``root/**/<image>`` + ``root/captions.jsonl`` lines ``{"file": relpath, "captions": [...]}``."""

    def __init__(self, root: str, spec: str):
        self.spec = spec
        self.root = os.path.abspath(os.path.expanduser(root))
        self.name = "captions-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(self.root)) or "set")
        index = os.path.join(self.root, "captions.jsonl")
        if not os.path.isfile(index):
            raise SourceError(f"{spec}: {index} not found; write one line {{\"file\": relpath, \"captions\": "
                              "[...]}} per image")
        entries: dict[str, list[str]] = {}
        with open(index, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                file, caps = _jsonl_entry(spec, index, n, line)
                if file in entries:
                    raise SourceError(f"{spec}: {index}:{n}: {file!r} is listed twice; merge its captions")
                entries[file] = caps
        if not entries:
            raise SourceError(f"{spec}: {index} lists no images")
        files = sorted(entries)
        _check_captions(spec, index, files, [entries[f] for f in files])
        _match_files(spec, self.root, files, index)
        self.files = files
        self.image_root = self.root
        self.paths = [os.path.join(self.root, f) for f in files]
        self.caps = [[c.strip() for c in entries[f]] for f in files]


def _jsonl_entry(spec: str, index: str, n: int, line: str) -> tuple[str, list]:
    try:
        d = json.loads(line)
        file, caps = d["file"], d["captions"]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{spec}: {index}:{n} is not a {{\"file\": ..., \"captions\": [...]}} JSON line "
                          f"({type(e).__name__}: {e})") from e
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(file, str) or not isinstance(caps, list):
        raise SourceError(f"{spec}: {index}:{n}: 'file' must be a string and 'captions' a list of strings")
    return os.path.normpath(file).replace(os.sep, "/"), caps


class HFCaptionSource(CaptionedSource):
    """A Hugging Face dataset (map mode) with an image column and a caption column (a string or a list)."""

    def __init__(self, dataset: str, spec: str, caption_column: str, split: str = "train",
                 image_column: str | None = None):
        self.spec, self.dataset, self.split = spec, dataset, split
        self.name = "hf-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_") or "captions")
        try:
            import datasets
            ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:  # noqa: BLE001 - hub/network/auth failures all get the same advice
            raise SourceError(f"could not open the Hugging Face dataset {dataset!r} (split {split!r}) for {spec}: "
                              f"{type(e).__name__}: {e}\nWays out: `huggingface-cli login` for gated datasets; "
                              "HF_HUB_OFFLINE=1 with a filled local cache; or a local copy (hf:/path/to/dir)") from e
        cols = list(ds.features)
        self.image_column = image_column or next((c for c in ("image", "img") if c in cols), None)
        for flag, col in (("--image-column", self.image_column), ("--caption-column", caption_column)):
            if col not in cols:
                raise SourceError(f"{spec}: column {col!r} not found in {dataset!r} (columns: {cols}); pass {flag}")
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # decode in the workers
        self.caps = [[c] if isinstance(c, str) else list(c or []) for c in ds[caption_column]]
        self.paths = [f"hf:{dataset}[{split}]#{i}" for i in range(len(ds))]
        _check_captions(spec, f"column {caption_column!r}", self.paths, self.caps)
        self.caps = [[c.strip() for c in cs] for cs in self.caps]
        self.ds = ds.select_columns([self.image_column])
        self._ds_fingerprint = getattr(ds, "_fingerprint", None)

    def fingerprint(self) -> dict:
        return {"kind": "hf-captions", "dataset": self.dataset, "split": self.split, "num_rows": len(self.paths),
                "datasets_fingerprint": self._ds_fingerprint, "captions_sha256": _captions_sha256(self.caps)}

    def listing(self):
        return None

    def get(self, key: int):
        return key, self.ds[int(key)][self.image_column]

    def decode(self, record):
        key, img = record
        name = self.paths[key]
        if isinstance(img, dict):  # datasets.Image(decode=False)
            src = io.BytesIO(img["bytes"]) if img.get("bytes") is not None else img.get("path")
            if not src:
                raise SourceError(f"{name}: empty image entry")
            return self._crop(self._load(src, name)), 0, name
        if hasattr(img, "convert"):
            return self._crop(to_rgb(img)), 0, name
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise SourceError(f"{name}: image column holds {arr.dtype} arrays; expected uint8 images")
        from PIL import Image
        return self._crop(to_rgb(Image.fromarray(arr))), 0, name


def is_captioned_spec(spec: str, caption_column: str | None = None) -> bool:
    return spec.startswith(("coco:", "captions:")) or (spec.startswith("hf:") and caption_column is not None)


def _open_captioned(opts) -> CaptionedSource:
    spec = opts.source
    kind, _, path = spec.partition(":")
    if not path:
        raise SourceError(f"{kind}: needs a path, e.g. {kind}:/data/coco")
    if kind == "coco":
        return COCOSource(path, spec, opts.split)
    if kind == "captions":
        return CaptionsFolderSource(path, spec)
    if getattr(opts, "streaming", None):
        raise SourceError(f"{spec} --caption-column: captioned Hugging Face sources are read map-style (the text "
                          "stage looks captions up by record key); drop --streaming")
    return HFCaptionSource(path, spec, opts.caption_column, split=opts.split, image_column=opts.image_column)


def _text_options(opts) -> tuple[str | None, str | None, int | None]:
    return (getattr(opts, "text_encoder", None), getattr(opts, "caption_column", None),
            getattr(opts, "max_captions", None))


def open_captioned_source(opts) -> "CaptionedSource | None":
    """The captioned source named by ``opts.source`` (coco:, captions:, hf: + --caption-column), else None.
    Text options given for a class-labelled source are refused (they would be silently ignored)."""
    text_encoder, caption_column, max_captions = _text_options(opts)
    if not is_captioned_spec(opts.source, caption_column):
        if text_encoder or max_captions or getattr(opts, "caption_crop", None):
            raise SourceError(f"--text-encoder/--max-captions/--caption-crop need a captioned source (coco:DIR, captions:DIR or "
                              f"hf:NAME --caption-column COL), not {opts.source!r}")
        return None
    if max_captions is not None and int(max_captions) < 1:
        raise SourceError(f"--max-captions must be >= 1, got {max_captions}")
    source = _open_captioned(opts)
    source.res = getattr(opts, "res", None)  # decode checks the ADM resize size first, as open_source does
    crop = getattr(opts, "caption_crop", None) or "adm"
    if crop not in ("adm", "uvit"):
        raise SourceError(f"--caption-crop must be adm or uvit, got {crop!r}")
    source.crop = crop
    return source


def text_stage_for(source, opts, device=None) -> "TextStage | None":
    """The text stage of a captioned source (None for others); with ``device`` its encoder is loaded now."""
    if not isinstance(source, CaptionedSource):
        return None
    text_encoder, _, max_captions = _text_options(opts)
    stage = TextStage(source, text_encoder or "clip-vit-L",
                      DEFAULT_MAX_CAPTIONS if max_captions is None else int(max_captions))
    if device is not None:
        stage.load(device)
    return stage


def open_text_stage(opts, device=None) -> "TextStage | None":
    """``text_stage_for(open_captioned_source(opts), opts, device)``."""
    source = open_captioned_source(opts)
    return None if source is None else text_stage_for(source, opts, device)


class TextStage:
    """Encodes the captions of a batch of record keys; writes the sidecars; describes itself for the manifest."""

    def __init__(self, source: CaptionedSource, encoder: str, max_captions: int):
        self.source, self.encoder_spec, self.k = source, encoder, max_captions
        self.encoder = None
        self.empty = None

    def load(self, device) -> None:
        """Load the frozen text encoder (fails fast, before any image is read) and encode ""."""
        self.encoder = load_text_encoder(self.encoder_spec, device)
        self.empty = self.encoder.encode([""])[0]

    def fields(self, codec: str) -> dict:
        shape = tuple(self.empty.shape)
        out = {R.text(i): feature_spec(shape, codec) for i in range(self.k)}
        out[R.NUM_CAPTIONS] = FieldSpec((), "int64", "raw")
        return out

    def __call__(self, keys) -> dict[str, torch.Tensor]:
        """{"text.<i>": (B, 77, H), "num_captions": (B,)} for the records ``keys`` (first k captions each)."""
        caps = [self.source.captions(int(key))[: self.k] for key in keys]
        flat = self.encoder.encode([c for cs in caps for c in cs])
        out = self.empty.expand(len(keys), self.k, *self.empty.shape).clone()  # unused slots: the null context
        pos = 0
        for b, cs in enumerate(caps):
            out[b, : len(cs)] = flat[pos: pos + len(cs)]
            pos += len(cs)
        arrays = {R.text(i): out[:, i] for i in range(self.k)}
        arrays[R.NUM_CAPTIONS] = torch.tensor([len(cs) for cs in caps], dtype=torch.int64)
        return arrays

    def finalize(self, out: str, storage_options=None, num_records: int | None = None) -> dict:
        """Write captions.json (keys 0..num_records-1: --limit keeps the first N) and empty_context.safetensors
        next to the shards; returns provenance["text"]."""
        from safetensors.torch import save
        n = len(self.source) if num_records is None else min(int(num_records), len(self.source))
        every = {str(i): self.source.captions(i) for i in range(n)}
        storage.write_bytes(storage.join(out, CAPTIONS_FILE),
                            json.dumps({"max_captions": self.k, "captions": every}).encode(), storage_options)
        blob = save({"empty_context": self.empty.contiguous()}, metadata={"text_encoder": self.encoder_spec})
        storage.write_bytes(storage.join(out, EMPTY_CONTEXT_FILE), blob, storage_options)
        counts = [len(c) for c in every.values()]
        return {"text_encoder": self.encoder.provenance, "max_captions": self.k,
                "fields": [R.text(i) for i in range(self.k)], "count_field": R.NUM_CAPTIONS,
                "captions_file": CAPTIONS_FILE, "empty_context_file": EMPTY_CONTEXT_FILE,
                "context_shape": list(self.empty.shape), "captions_total": int(sum(counts)),
                "captions_truncated": int(sum(max(0, c - self.k) for c in counts))}
