"""A symlink loop in an image folder through repa-preprocess: `class/up -> ..` made 24 images 984 records."""
from __future__ import annotations

import numpy as np
from PIL import Image

from repa.preprocess.cli import main
from repa.shards import ShardStream


def test_symlink_loop_end_to_end(tmp_path, capsys, faults):
    data = tmp_path / "data"
    for c in range(3):
        for i in range(8):
            (data / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 10 * (8 * c + i), np.uint8)).save(data / f"c{c}" / f"{i}.png")
    (data / "c1" / "up").symlink_to("..")
    s = main.main([f"imagefolder:{data}", "--res", "16", "--vae", "none", "--enc-type", "none", "--out",
                   str(tmp_path / "out"), "--shard-size", "10", "--num-workers", "0", "--no-progress"],
                  standalone_mode=False)
    assert s["records"] == 24 and s["skipped"] == 0
    assert f"are left out (e.g. {data / 'c1' / 'up'} -> {data})" in capsys.readouterr().err
    batch = next(iter(ShardStream(str(tmp_path / "out"), 64, shuffle=False)))
    keys = list(map(int, batch["key"]))
    assert sorted(keys) == list(range(24))
    # key k is the k-th file of the sorted listing: its pixel value is 10 * k (--vae none stores x/127.5 - 1)
    vals = {k: int(np.rint((m[0, 0, 0].item() + 1) * 127.5)) for k, m in zip(keys, batch["moments"])}
    assert vals == {k: 10 * k for k in range(24)}
    assert [int(x) for x in batch["label"][np.argsort(keys)]] == [k // 8 for k in range(24)]
    faults.record(faults=1, runs=1, records_lost=0, kind="symlink loop")
