"""repa-preprocess reruns that must not lose or mix work (issue #11): a changed source, the strict-mode advice for
a bad image, folders that are not ours, a corrupt shard, a failed model load, an empty source.

Pixel space (`--vae none --enc-type none`) and tiny images: each run takes a fraction of a second. Killed runs
are forks of the test process (tests/faults/conftest.py:run_forked) that SIGKILL themselves after a shard."""
from __future__ import annotations

import json
import os
import signal
import tarfile
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from faults.conftest import run_forked, sigkill_self

RES = 16


def make_folder(root: Path, n: int, classes: int = 3) -> list[Path]:
    """n distinct 8x8 PNGs in `classes` class folders; returns the paths in source order (sorted)."""
    rng = np.random.default_rng(n)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{i % classes}" / f"im{i:04d}.png")
    return sorted(root.rglob("*.png"))


def pp_args(data, out, *extra, shard_size=100, batch=50):
    return [f"imagefolder:{data}", "--res", str(RES), "--vae", "none", "--enc-type", "none", "--out", str(out),
            "--shard-size", str(shard_size), "--batch-size", str(batch), "--num-workers", "0", "--no-progress",
            *extra]


def cli(args):
    from repa.preprocess.cli import main
    return main.main(args, standalone_mode=False)


def tar_records(out) -> dict[int, dict[str, bytes]]:
    """{key: {member extension: raw bytes}} of every shard named in the manifest (standard-library tarfile)."""
    man = json.loads((Path(out) / "manifest.json").read_text())
    recs: dict[int, dict[str, bytes]] = {}
    for sh in man["shards"]:
        with tarfile.open(Path(out) / sh["name"]) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                assert field not in recs.get(int(key), {}), f"key {key} twice"
                recs.setdefault(int(key), {})[field] = tf.extractfile(m).read()
    return recs


def killed_after_shards(args, n_shards: int):
    """A forked `repa-preprocess args` that SIGKILLs itself once `n_shards` shards are closed."""
    def target():
        from repa.preprocess import pipeline
        real = pipeline._ShardWriters._count
        closed = []

        def count(self, j):
            real(self, j)
            if j not in self.open and j not in closed:  # shard j was just closed
                closed.append(j)
                if len(closed) == n_shards:
                    sigkill_self()
        pipeline._ShardWriters._count = count
        cli(args)
    assert run_forked(target) == -signal.SIGKILL


# ---------------------------------------------------------------- 2. resume knows its inputs

def test_changed_source_refused_naming_the_change(tmp_path, faults):
    data, out = tmp_path / "data", tmp_path / "out"
    paths = make_folder(data, 600)
    args = pp_args(data, out)
    killed_after_shards(args, 2)
    assert sum(n.endswith(".tar.json") for n in os.listdir(out)) == 2
    old = paths[5]
    old.rename(old.with_name("renamed.png"))  # shifts the keys of every later file
    with pytest.raises(click.ClickException) as e:
        cli(args)
    msg = e.value.message
    assert "source changed" in msg and "renamed.png" in msg and old.name in msg, msg
    assert "--out NEW" in msg and "restore the files" in msg.lower()
    print(msg)
    assert "manifest.json" not in os.listdir(out)
    old.with_name("renamed.png").rename(old)  # the advised fix: restore the files, rerun the same command
    s = cli(args)
    ref = tmp_path / "ref"
    cli(pp_args(data, ref))
    assert s["records"] == 600 and s["records_written"] == 400
    got, want = tar_records(out), tar_records(ref)
    assert sorted(got) == list(range(600)) and got == want
    faults.record(faults=2, kind="changed source", runs=2, records_lost=600 - len(got))


def test_changed_source_before_any_shard_restarts_cleanly(tmp_path, faults):
    """Nothing was written yet (killed before the first shard closed): the new listing is simply taken."""
    data, out = tmp_path / "data", tmp_path / "out"
    paths = make_folder(data, 30)
    args = pp_args(data, out, shard_size=10, batch=5)
    killed_after_shards(args, 1)
    for n in os.listdir(out):  # as if killed before the first shard closed: drop it
        if n.startswith("shard-"):
            os.unlink(out / n)
    paths[0].unlink()
    s = cli(args)
    assert s["records"] == 29 and sorted(tar_records(out)) == list(range(29))
    faults.record(faults=1, kind="changed source", runs=1)


def _bad_set(tmp_path, bad_at_shard: int):
    """30 images in shards of 5 (batch = shard, so every earlier shard is closed when the bad one is read);
    the image whose key comes first in shard `bad_at_shard` of the write order is replaced by garbage."""
    from repa.preprocess.pipeline import shard_plan
    data = tmp_path / "data"
    paths = make_folder(data, 30)
    key = int(shard_plan(30, 5, shuffle=True, seed=0)[bad_at_shard][0])
    paths[key].write_bytes(b"not an image\n")
    return data, paths, key, pp_args(data, tmp_path / "out", shard_size=5, batch=5)


def test_bad_image_advice_skip_bad_one_rerun(tmp_path, faults):
    data, paths, key, args = _bad_set(tmp_path, 3)
    with pytest.raises(click.ClickException) as e:
        cli(args)
    msg = e.value.message
    assert str(paths[key]) in msg and "--skip-bad" in msg, msg
    assert "3 shards" in msg and "new --out" in msg  # removing the file now would change the source listing
    s = cli(args + ["--skip-bad"])  # the advised command, once
    recs = tar_records(tmp_path / "out")
    assert sorted(recs) == sorted(set(range(30)) - {key})
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [x["key"] for x in man["provenance"]["skipped"]] == [key] and s["records_written"] == 14
    faults.record(faults=1, kind="bad image", runs=1, records_lost=29 - len(recs))


def test_bad_image_advice_remove_the_file_one_rerun(tmp_path, faults):
    data, paths, key, args = _bad_set(tmp_path, 0)
    with pytest.raises(click.ClickException) as e:
        cli(args)
    msg = e.value.message
    assert "remove the file" in msg and "rerun the same command" in msg, msg
    paths[key].unlink()  # the advice, then the same command once
    s = cli(args)
    recs = tar_records(tmp_path / "out")
    assert s["records"] == 29 and sorted(recs) == list(range(29))
    faults.record(faults=1, kind="bad image", runs=1, records_lost=29 - len(recs))


def test_removing_a_bad_file_after_shards_were_written_is_refused(tmp_path, faults):
    data, paths, key, args = _bad_set(tmp_path, 3)
    with pytest.raises(click.ClickException):
        cli(args)
    paths[key].unlink()
    with pytest.raises(click.ClickException) as e:
        cli(args)
    assert "source changed" in e.value.message and paths[key].name in e.value.message
    faults.record(faults=1, kind="changed source", runs=0)


# ---------------------------------------------------------------- 4. never touch what is not ours

def test_foreign_folder_refused_and_user_files_survive(tmp_path, faults):
    data = tmp_path / "data"
    make_folder(data, 12)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"my own tar")
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(click.ClickException) as e:
        cli(pp_args(data, foreign, shard_size=5, batch=5))
    assert str(foreign) in e.value.message and "not a repa shard set" in e.value.message and "--out" in e.value.message
    assert sorted(os.listdir(foreign)) == ["notes.txt", "shard-000000.tar"]
    assert (foreign / "shard-000000.tar").read_bytes() == b"my own tar"

    out = tmp_path / "out"  # our set, killed mid-run, with a user's file dropped into it
    args = pp_args(data, out, shard_size=5, batch=5)
    killed_after_shards(args, 1)
    (out / "thesis.tmp-2.docx").write_bytes(b"chapter 1")
    (out / "shard-000001.tar.tmp-notes").write_bytes(b"user notes")
    assert cli(args)["records"] == 12
    assert (out / "thesis.tmp-2.docx").read_bytes() == b"chapter 1"
    assert (out / "shard-000001.tar.tmp-notes").read_bytes() == b"user notes"
    faults.record(faults=2, kind="foreign files", runs=1)


# ---------------------------------------------------------------- 5. repair

def test_rerun_rewrites_a_corrupt_shard(tmp_path, faults):
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data, 12)
    args = pp_args(data, out, shard_size=5, batch=5)
    cli(args)
    want = tar_records(out)
    shard = out / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[512 + 100] ^= 0xFF  # one bit pattern in the first record's payload: same size, bad CRC
    shard.write_bytes(bytes(raw))
    s = cli(args)  # the advised repair: the same command again
    assert s["records_written"] == 5 and s["shards_written"] == 1
    assert tar_records(out) == want
    faults.record(faults=1, kind="corrupt shard", runs=1)


# ---------------------------------------------------------------- 6. a failed model load does not lock the folder

def test_failed_vae_load_then_corrected_command(tmp_path, faults):
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data, 6)
    bad = pp_args(data, out, shard_size=5, batch=5)
    bad[bad.index("--vae") + 1] = str(tmp_path / "no-such-vae")
    with pytest.raises(click.ClickException, match="--vae"):
        cli(bad)
    s = cli(pp_args(data, out, shard_size=5, batch=5))  # the corrected command (--vae none)
    assert s["records"] == 6 and sorted(tar_records(out)) == list(range(6))
    assert json.loads((out / "preprocess.json").read_text())["settings"]["vae"] == "none"
    faults.record(faults=1, kind="model load", runs=1)


# ---------------------------------------------------------------- 7. an empty source

def test_empty_source_refused_before_work(tmp_path, monkeypatch):
    """No CLI source yields 0 images today (folders and HF datasets refuse earlier), but a source that does
    (e.g. a folder whose every entry is filtered out) must stop before anything is created."""
    from repa.preprocess import pipeline
    from repa.preprocess.sources import Source

    class Empty(Source):
        spec, name, num_classes = "imagefolder:/data/empty", "empty", 1

        def __len__(self):
            return 0

    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: Empty())
    out = tmp_path / "out"
    with pytest.raises(click.ClickException, match="no images found in imagefolder:/data/empty"):
        cli(["imagefolder:/data/empty", "--res", "16", "--vae", "none", "--enc-type", "none", "--out", str(out),
             "--num-workers", "0", "--no-progress"])
    assert not out.exists()


def test_s3_rerun_aborts_leaked_uploads_and_rewrites_a_corrupt_shard(s3_bucket, tmp_path, faults):
    from repa.shards import storage
    data = tmp_path / "data"
    make_folder(data, 12)
    url = f"{s3_bucket}/set"
    args = pp_args(data, url, shard_size=5, batch=5)
    cli(args)
    fs, path = storage.filesystem(url)
    bucket = path.split("/", 1)[0]
    want = fs.cat_file(f"{path}/shard-000001.tar")
    raw = bytearray(want)
    raw[512 + 100] ^= 0xFF
    fs.pipe_file(f"{path}/shard-000001.tar", bytes(raw))  # same size, bad CRC
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key="set/shard-000002.tar")  # a killed upload's parts
    s = cli(args)
    assert s["records_written"] == 5 and s["records"] == 12
    assert fs.cat_file(f"{path}/shard-000001.tar") == want
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="set/").get("Uploads")
    faults.record(faults=2, kind="object store leftovers", runs=1)
