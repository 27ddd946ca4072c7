"""Image sources: stable global index, labels, the offline digits set, HF datasets (local parquet)."""
import contextlib
import io
import re
import signal

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


def _png(path, seed=0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer: a listing that loops is a regression."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _classes(root, names="abc", n=8):
    for c in names:
        for i in range(n):
            _png(root / c / f"{i}.png", seed=ord(c) * 10 + i)
    return sorted(str(root / c / f"{i}.png") for c in names for i in range(n))


def test_imagefolder_symlink_loop(tmp_path):
    """class/up -> .. made 24 images 984 records (41 copies each)."""
    root = tmp_path / "data"
    want = _classes(root)
    (root / "b" / "up").symlink_to("..")
    with deadline(20):
        src = open_source(f"imagefolder:{root}")
    assert src.paths == want and [src.get(k)[1] for k in range(24)] == [i // 8 for i in range(24)]
    assert src.repeats == [(str(root / "b" / "up"), str(root))]
    assert src.notes() == [f"imagefolder:{root}: 1 symlinked path(s) repeat folders or files already listed and "
                           f"are left out (e.g. {root / 'b' / 'up'} -> {root})"]


def test_imagefolder_symlinks_followed_once(tmp_path):
    """Every directory (by st_dev, st_ino) and every file is listed once, at its real path if it has one."""
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _classes(root)
    (root / "a" / "up").symlink_to("..")                      # a loop back to the root
    (root / "b" / "deep").mkdir()
    (root / "b" / "deep" / "loop").symlink_to("..")           # a loop back to b
    (root / "c" / "alias.png").symlink_to("../a/0.png")       # a second name for a listed file
    _png(outside / "d" / "x.png", seed=99)
    (root / "d").symlink_to(outside / "d")                    # a class folder kept on another disk: followed
    (root / "e").symlink_to("a")                              # a class that is another class: left out
    (root / "b" / "ext.png").symlink_to(outside / "d" / "x.png")  # same file as d/x.png: listed once
    with deadline(20):
        src = open_source(f"imagefolder:{root}")
    want = sorted([str(root / c / f"{i}.png") for c in "abc" for i in range(8)] + [str(root / "d" / "x.png")])
    assert src.paths == want and len(src) == 25
    assert src.classes == ["a", "b", "c", "d"] and [src.get(k)[1] for k in (0, 8, 16, 24)] == [0, 1, 2, 3]
    assert src.repeats == sorted([(str(root / "a" / "up"), str(root)),
                                  (str(root / "b" / "deep" / "loop"), str(root / "b")),
                                  (str(root / "c" / "alias.png"), str(root / "a" / "0.png")),
                                  (str(root / "e"), str(root / "a")),
                                  (str(root / "b" / "ext.png"), str(root / "d" / "x.png"))])
    img, label, name = src.decode(src.get(24))
    assert label == 3 and name == str(root / "d" / "x.png")
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(outside / "d" / "x.png")))


def test_imagefolder_special_files_refused_before_work(tmp_path):
    import os
    root = tmp_path / "data"
    _png(root / "a" / "ok.png")
    os.mkfifo(root / "a" / "pipe.png")
    (root / "a" / "gone.jpg").symlink_to(root / "a" / "missing.jpg")
    with pytest.raises(SourceError) as e:
        open_source(f"imagefolder:{root}")
    msg = str(e.value)
    assert str(root / "a" / "gone.jpg") in msg and "broken symbolic link" in msg and "1 more" in msg
    assert "--skip-bad" in msg
    src = open_source(f"imagefolder:{root}", skip_bad=True)  # kept under their keys, reported by decode
    assert src.paths == [str(root / "a" / p) for p in ("gone.jpg", "ok.png", "pipe.png")]
    for k, kind in ((0, "broken symbolic link"), (2, "named pipe (FIFO)")):
        with pytest.raises(SourceError, match=re.escape(kind)):
            src.decode(src.get(k))
    assert src.decode(src.get(1))[2] == str(root / "a" / "ok.png")
    assert src.notes() == [f"imagefolder:{root}: 2 file(s) named like images are not regular files and will be "
                           f"skipped (e.g. {root / 'a' / 'gone.jpg'}: broken symbolic link (FileNotFoundError))"]


def test_folder_fingerprint_and_diff(tmp_path):
    from repa.preprocess.sources import diff_listings, listing_sha256
    root = tmp_path / "data"
    for i in range(5):
        _png(root / "c" / f"{i}.png", seed=i)
    src = open_source(f"imagefolder:{root}")
    old = src.listing()
    sizes = [(root / "c" / f"{i}.png").stat().st_size for i in range(5)]
    assert old == [[f"c/{i}.png", sizes[i]] for i in range(5)]
    fp = src.fingerprint()
    assert fp == {"kind": "imagefolder", "num_rows": 5, "classes": 1, "bytes": sum(sizes),
                  "sha256": listing_sha256(old)}
    import hashlib
    text = "".join(f"c/{i}.png\t{sizes[i]}\n" for i in range(5)).encode()
    assert fp["sha256"] == hashlib.sha256(text).hexdigest()
    # the same tree elsewhere: same fingerprint; a listing compared with itself: no difference
    import shutil
    shutil.copytree(root, tmp_path / "copy")
    assert open_source(f"imagefolder:{tmp_path / 'copy'}").fingerprint() == fp and diff_listings(old, old) == []
    # change it: one file removed, one added before it in key order, one rewritten with another size
    (root / "c" / "3.png").unlink()
    _png(root / "c" / "1b.png", seed=7)
    _png(root / "c" / "4.png", seed=4, size=(9, 9))
    src2 = open_source(f"imagefolder:{root}")
    assert src2.fingerprint()["sha256"] != fp["sha256"]
    new = src2.listing()
    d = diff_listings(old, new)
    assert d[0] == "1 added, 1 removed, 1 changed in size (5 -> 5 files); the first difference is at key 2"
    assert d[1:] == [f"added c/1b.png ({new[2][1]} bytes)", f"removed c/3.png ({sizes[3]} bytes)",
                     f"size changed c/4.png: {sizes[4]} -> {new[4][1]} bytes"]
    assert diff_listings(old, new, limit=1)[1:] == [d[1]]
    assert diff_listings(old, old[:3])[0].endswith("(5 -> 3 files); the first difference is at key 3")


def test_digits_and_hf_fingerprints(tmp_path):
    fp = open_source("digits").fingerprint()
    assert fp["num_rows"] == 1797 and fp == open_source("digits").fingerprint() and len(fp["sha256"]) == 64
    write_parquet_dataset(tmp_path / "hf")
    a = open_source(f"hf:{tmp_path / 'hf'}").fingerprint()
    assert a["kind"] == "hf" and a["num_rows"] == 7 and a["split"] == "train" and not a["streaming"]
    assert a["datasets_fingerprint"] and a == open_source(f"hf:{tmp_path / 'hf'}").fingerprint()
    write_parquet_dataset(tmp_path / "hf", n=8)  # new data files under the same name
    b = open_source(f"hf:{tmp_path / 'hf'}").fingerprint()
    assert b["num_rows"] == 8 and b["datasets_fingerprint"] != a["datasets_fingerprint"]
    s = open_source(f"hf:{tmp_path / 'hf'}", streaming=True).fingerprint()
    assert s["streaming"] and len(s["data_files"]) == 64
