"""Bad images through repa-preprocess (imagefolder source, pixel space): every file of the hidden-corner corpus
is converted correctly or reported with its path; --skip-bad lists the bad ones in the manifest."""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pytest
import torch
from PIL import Image

from faults.corpus import EXPECTED, write_corpus
from repa.preprocess.cli import main
from repa.preprocess.crop import adm_center_crop
from repa.shards import ShardStream

RES = 16


def args(data, out, *extra):
    return [f"imagefolder:{data}", "--res", str(RES), "--vae", "none", "--enc-type", "none", "--out", str(out),
            "--shard-size", "5", "--batch-size", "4", "--num-workers", "1", "--no-progress", *extra]


def pixels(moments: torch.Tensor) -> np.ndarray:
    """--vae none stores mean = image/127.5 - 1: back to uint8 HWC."""
    return np.rint((moments[:3].float().numpy() + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)


def test_corpus_converted_or_reported(tmp_path, faults):
    paths = write_corpus(tmp_path / "data")
    bad = {n for n, v in EXPECTED.items() if v == "bad"}
    with pytest.raises(click.ClickException) as e:  # strict (default): the first bad file stops the run, named
        main.main(args(tmp_path / "data", tmp_path / "strict"), standalone_mode=False)
    assert any(str(paths[n]) in e.value.message for n in bad), e.value.message
    assert "--skip-bad" in e.value.message

    s = main.main(args(tmp_path / "data", tmp_path / "out", "--skip-bad"), standalone_mode=False)
    stream = ShardStream(str(tmp_path / "out"), 64, shuffle=False)
    skipped = stream.manifest.provenance["skipped"]
    assert {Path(x["path"]).name for x in skipped} == bad and s["skipped"] == len(bad)
    assert all(x["error"] and Path(x["path"]).is_file() for x in skipped)
    errors = {Path(x["path"]).name: x["error"] for x in skipped}
    assert errors["huge_20000.png"].startswith(
        f"ImageTooLargeError: {paths['huge_20000.png']}: image of 400000000 px is over the limit "
        "REPA_MAX_IMAGE_PIXELS=178956970"), errors["huge_20000.png"]
    assert "image of 1 x 200000 px (side 200000) is over the limit REPA_MAX_IMAGE_SIDE" in errors["thin_1x200000.png"]
    assert errors["not_an_image.jpg"] == ("UnidentifiedImageError: cannot identify image file "
                                          f"{paths['not_an_image.jpg']}")

    batch = next(iter(stream))
    order = sorted(str(p) for p in paths.values())  # global index = position in the sorted listing
    got = {Path(order[int(k)]).name: pixels(m) for k, m in zip(batch["key"], batch["moments"])}
    assert set(got) == {n for n, v in EXPECTED.items() if v == "ok"}

    def crop(img):
        return adm_center_crop(img, RES)

    # 16-bit grey: v / 257 rounded (not PIL's clipping to 255)
    g16 = np.asarray(Image.open(paths["gray16.png"])).astype(np.float64)
    want = crop(Image.fromarray(np.rint(g16 / 257).astype(np.uint8)).convert("RGB"))
    assert np.abs(got["gray16.png"].astype(int) - want.astype(int)).max() <= 1
    # EXIF orientation 6 applied: the stored image is the upright (rotated) one
    raw = Image.open(paths["exif_rotated.jpg"]).convert("RGB")
    upright, sideways = crop(raw.transpose(Image.Transpose.ROTATE_270)), crop(raw)
    d_up = np.abs(got["exif_rotated.jpg"].astype(int) - upright.astype(int)).mean()
    d_side = np.abs(got["exif_rotated.jpg"].astype(int) - sideways.astype(int)).mean()
    assert d_up <= 1 < d_side
    # CMYK, palette+transparency, RGBA, grey, 1x1: 8-bit RGB of the same picture
    for name in ("cmyk.jpg", "palette_alpha.png", "rgba.png", "gray.jpg", "one_pixel.png"):
        with Image.open(paths[name]) as im:
            im = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
            assert np.abs(got[name].astype(int) - crop(im).astype(int)).max() <= 1, name
    faults.record(faults=len(EXPECTED), kind="corpus files", runs=1, records_lost=0)
