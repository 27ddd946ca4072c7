"""Image sources: stable global index, labels, the offline digits set, HF datasets (local parquet)."""
import io

import numpy as np
import pytest
from PIL import Image

from repa.preprocess.sources import SourceError, open_source


def test_digits_source():
    from sklearn.datasets import load_digits
    src = open_source("digits")
    assert len(src) == 1797 and src.num_classes == 10 and src.indexable
    raw = load_digits()
    labels = [src.get(k)[2] for k in range(len(src))]
    np.testing.assert_array_equal(labels, raw.target)
    assert set(labels) == set(range(10))
    for k in (0, 5, 1796):
        img, label, name = src.decode(src.get(k))
        arr = np.asarray(img)
        assert img.mode == "RGB" and arr.shape == (8, 8, 3) and label == raw.target[k]
        np.testing.assert_array_equal(arr[..., 0], np.rint(raw.images[k] * 255 / 16).astype(np.uint8))
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        assert name == f"digits#{k}"


def test_imagefolder_order_and_labels(tmp_path):
    root = tmp_path / "data"
    files = ["b/z.png", "b/sub/a.png", "a/2.jpg", "a/10.jpg", "c/x.PNG"]
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 5)).save(p, format="PNG" if f.lower().endswith("png") else "JPEG")
    (root / "a" / "notes.txt").write_text("not an image")
    src = open_source(f"imagefolder:{root}")
    # sorted by full path, labels = index of the top-level folder in the sorted class names
    expected = sorted(str(root / f) for f in files)
    assert src.paths == expected
    assert [src.get(k)[1] for k in range(len(src))] == [0, 0, 1, 1, 2]
    assert src.num_classes == 3 and src.name == "imagefolder-data"
    (root / "loose.png").write_bytes((root / "b" / "z.png").read_bytes())
    with pytest.raises(SourceError, match="loose.png"):
        open_source(f"imagefolder:{root}")


def test_imagenet_folder_needs_synsets(tmp_path):
    for d in ("n01440764", "n01443537"):
        (tmp_path / "train" / d).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / d / "x.JPEG")
    src = open_source("imagenet", data_dir=str(tmp_path / "train"))
    assert src.classes == ["n01440764", "n01443537"] and len(src) == 2
    with pytest.raises(SourceError, match="train"):
        open_source("imagenet", data_dir=str(tmp_path))  # the parent (holds "train", not synsets)
    with pytest.raises(SourceError, match="unknown source"):
        open_source("mnist")


def write_parquet_dataset(root, n=7, num_classes=3):
    """A local HF image-classification dataset (parquet), readable by datasets.load_dataset offline."""
    import datasets
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        imgs.append({"bytes": buf.getvalue(), "path": None})
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % num_classes for i in range(n)]}, features=feats)
    root.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "train.parquet"))
    return imgs


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source(tmp_path, streaming):
    imgs = write_parquet_dataset(tmp_path / "hf")
    src = open_source(f"hf:{tmp_path / 'hf'}", streaming=streaming)
    assert src.indexable == (not streaming) and src.num_classes == 3
    if streaming:  # a fresh local stream does not know its length: the pipeline then needs --limit
        with pytest.raises(SourceError, match="--limit"):
            len(src)
    else:
        assert len(src) == 7
    got = list(src.stream(3))
    assert [k for k, _ in got] == [3, 4, 5, 6]
    for k, rec in got:
        img, label, name = src.decode(rec)
        assert label == k % 3 and name.endswith(f"#{k}")
        np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(imgs[k]["bytes"]))))
    with pytest.raises(SourceError, match="--image-column"):
        open_source(f"hf:{tmp_path / 'hf'}", image_column="pixels", streaming=streaming)
