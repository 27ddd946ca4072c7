"""Decompression bombs: small files that declare huge images, and thin images that the ADM crop blows up.

A 680 KB PNG of 1 x 200,000 px took 8.6 GB at --res 64 (the crop's BICUBIC step makes it 64 x 12,800,000).
The header size is now checked before decoding (each side, the pixel count, and the size of the crop's resize),
so the bomb is refused with the limit's name; the peak RSS of a real child process (/proc VmHWM, beside
resource.getrusage) shows the bound holds. The
child runs under an address-space cap, so a regression fails with MemoryError instead of swapping the host."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from faults.corpus import huge_png

REPO = Path(__file__).resolve().parents[2]
AS_CAP = 2 << 30  # bytes of address space for the child (the unbounded bomb needs > 8 GB)

CHILD = textwrap.dedent("""
    import json, resource, sys
    from repa.preprocess.crop import adm_center_crop
    from repa.preprocess.sources import open_source
    folder, res, with_res = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    src = open_source("imagefolder:" + folder, **({"res": res} if with_res else {}))
    out = {}
    try:
        img, label, name = src.decode(src.get(0))
        arr = adm_center_crop(img, res)
        out["ok"] = [list(arr.shape), int(arr.min()), int(arr.max())]
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    # peak RSS of this process image: VmHWM restarts at exec, while getrusage's ru_maxrss also counts
    # the forking parent (pytest, torch loaded); both are printed
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    out["maxrss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else None
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
""")


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


def decode_in_child(folder: Path, res: int, with_res: bool = True, **env) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(res), "1" if with_res else "0"],
                       capture_output=True, text=True, timeout=120, env=e, cwd=REPO, preexec_fn=_cap)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    """Folders holding one single-colour PNG each: 1 x 200,000 px (680 KB) and 1 x 2,000 px."""
    root = tmp_path_factory.mktemp("bombs")
    out = {}
    for name, h in (("bomb", 200_000), ("thin", 2_000)):
        (root / name / "c").mkdir(parents=True)
        (root / name / "c" / f"1x{h}.png").write_bytes(huge_png(1, h, 7))
        out[name] = root / name
    return out


def test_thin_bomb_refused_with_bounded_memory(thin, faults):
    path = thin["bomb"] / "c" / "1x200000.png"
    assert path.stat().st_size < 1_000_000
    r = decode_in_child(thin["bomb"], 64)  # default limits: the side limit refuses it
    assert r["error"].startswith(f"ImageTooLargeError: {path}: image of 1 x 200000 px (side 200000) is over "
                                 "the limit REPA_MAX_IMAGE_SIDE=65535"), r
    assert "REPA_MAX_IMAGE_SIDE=200000 repa-preprocess" in r["error"]
    assert r["maxrss_mb"] < 300, r
    # side limit raised: the resize limit refuses it, still from the header (the source knows --res)
    r = decode_in_child(thin["bomb"], 64, REPA_MAX_IMAGE_SIDE=10**6)
    assert (f"{path}: image of 1 x 200000 px, which the ADM crop at --res 64 resizes to 64 x 12800000 px "
            "(819200000 px), is over the limit REPA_MAX_RESIZED_PIXELS=16777216") in r["error"], r
    assert r["maxrss_mb"] < 300, r
    # a caller that only crops (no res on the source): refused by adm_center_crop before it resizes
    r = decode_in_child(thin["bomb"], 64, with_res=False, REPA_MAX_IMAGE_SIDE=10**6)
    assert "resizes to 64 x 12800000 px" in r["error"] and r["maxrss_mb"] < 300, r
    faults.record(faults=3, runs=0, records_lost=0, kind="decompression bomb")


def test_limits_admit_and_refuse_at_the_boundary(thin, faults):
    # 1 x 2000 at --res 64 resizes to 64 x 128000 = 8,192,000 px: admitted by default, and decoded right
    r = decode_in_child(thin["thin"], 64)
    assert r["ok"] == [[64, 64, 3], 7, 7], r
    # exactly at the limit: admitted; one pixel under it: refused, naming the limit and the needed value
    assert decode_in_child(thin["thin"], 64, REPA_MAX_RESIZED_PIXELS=8_192_000)["ok"] == [[64, 64, 3], 7, 7]
    r = decode_in_child(thin["thin"], 64, REPA_MAX_RESIZED_PIXELS=8_191_999)
    assert "REPA_MAX_RESIZED_PIXELS=8191999 " in r["error"] and "REPA_MAX_RESIZED_PIXELS=16383998" in r["error"]
    r = decode_in_child(thin["thin"], 64, REPA_MAX_IMAGE_PIXELS=1999)
    assert "image of 1 x 2000 px (2000 px) is over the limit REPA_MAX_IMAGE_PIXELS=1999" in r["error"], r
    faults.record(faults=2, runs=3, records_lost=0, kind="size limit boundary")


def test_raised_pixel_limit_overrides_pils(tmp_path, monkeypatch):
    """PIL's own check refuses > 2 x Image.MAX_IMAGE_PIXELS at open; a raised REPA_MAX_IMAGE_PIXELS must win."""
    from PIL import Image
    from repa.preprocess.crop import ImageLimits, load_rgb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for PIL's default, scaled down
    path = tmp_path / "wide.png"
    path.write_bytes(huge_png(3000, 1, 9, rows_per_block=1))  # 3000 px > 2 x 1000
    img = load_rgb(str(path), limits=ImageLimits(max_pixels=5000))
    assert img.size == (3000, 1) and np.asarray(img).max() == 9
    with pytest.raises(ValueError, match="REPA_MAX_IMAGE_PIXELS=2999 "):
        load_rgb(str(path), limits=ImageLimits(max_pixels=2999))
