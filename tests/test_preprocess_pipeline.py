"""repa-preprocess end to end with tiny random-weight models loaded through the users' code paths.

Models: a tiny diffusers AutoencoderKL (save_pretrained -> `--vae DIR`) and a tiny DINOv2-architecture timm
ViT (save_for_hf -> `--enc-type timm:local-dir:DIR`). Data: 12 generated images of odd sizes and modes in
3 class folders. Records are read back with the standard library's tarfile (independent of our reader).
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.preprocess.cli import main
from repa.preprocess.crop import adm_center_crop, load_rgb
from repa.preprocess.pipeline import Options, run, shard_plan
from repa.shards import FieldSpec, decode_field, read_manifest

RES = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    import timm
    from diffusers import AutoencoderKL
    from timm.models import save_for_hf
    torch.manual_seed(0)
    vit_args = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **vit_args)
    save_for_hf(vit, str(root / "teacher"), model_args=vit_args, safe_serialization=True)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=RES)
    vae.save_pretrained(str(root / "vae"))
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "RGB"]
    for i in range(12):
        h, w = 30 + 7 * i, 70 - 3 * i
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(modes[i % len(modes)])
        d = root / "img" / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"im{i:02d}.{'jpg' if img.mode == 'CMYK' else 'png'}")
    return root


def cli_args(assets, out, *extra):
    return [f"imagefolder:{assets / 'img'}", "--res", str(RES), "--vae", str(assets / "vae"),
            "--enc-type", f"timm:local-dir:{assets / 'teacher'}", "--out", str(out), "--shard-size", "5",
            "--batch-size", "5", "--num-workers", "0", "--no-progress", *extra]


def run_cli(args):
    return main.main(args, standalone_mode=False)


def read_records(out):
    """{key: {field: tensor}} from every shard of the manifest, plus the manifest."""
    man = read_manifest(str(out))
    recs = {}
    for sh in man.shards:
        with tarfile.open(Path(out) / sh.name) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                if field == "crc":
                    continue
                data = tf.extractfile(m).read()
                recs.setdefault(int(key), {})[field] = decode_field(data, man.fields[field])
    return recs, man


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "set"
    summary = run_cli(cli_args(assets, out, "--feature-codec", "fp32", "--flip", "--num-workers", "2"))
    return out, summary


def _reference_models(assets):
    from repa.preprocess.teachers import load_teacher
    from repa.preprocess.vae import load_vae
    return load_vae(str(assets / "vae"), "cpu"), load_teacher(f"timm:local-dir:{assets / 'teacher'}", RES, "cpu")


def test_records_equal_models_on_cropped_images(assets, baseline):
    out, summary = baseline
    recs, man = read_records(out)
    paths = sorted(str(p) for p in (assets / "img").rglob("*.*"))
    assert sorted(recs) == list(range(12)) and man.num_records == 12 and summary["records"] == 12
    vae, teacher = _reference_models(assets)
    imgs = torch.stack([torch.from_numpy(adm_center_crop(load_rgb(p), RES)).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        moments = vae.encode_moments(imgs.float() / 127.5 - 1)
        moments_flip = vae.encode_moments(imgs.flip(-1).float() / 127.5 - 1)
        feats, feats_flip = teacher(imgs), teacher(imgs.flip(-1))
    for k, p in enumerate(paths):
        r = recs[k]
        assert int(r["label"]) == int(Path(p).parent.name[-1])
        torch.testing.assert_close(r["moments"], moments[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["moments_flip"], moments_flip[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["feat.0"], feats[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["feat_flip.0"], feats_flip[k], rtol=1e-5, atol=1e-5)
    # the features of the flipped image are not the flipped features
    grid = feats.view(12, 2, 2, -1)
    assert not torch.allclose(feats_flip, grid.flip(2).reshape(12, 4, -1), atol=1e-3)
    assert man.fields["moments"] == FieldSpec((8, RES // 2, RES // 2), "float32", "raw")
    assert man.fields["feat.0"].shape == (4, 32) and man.fields["feat.0"].codec == "fp32"
    # write order: the seeded permutation cut into shards of 5 (classes mixed within shards)
    plan = shard_plan(12, 5, shuffle=True, seed=0)
    for j, sh in enumerate(man.shards):
        with tarfile.open(Path(out) / sh.name) as tf:
            keys = [int(m.name.split(".")[0]) for m in tf.getmembers() if m.name.endswith(".label")]
        assert keys == list(plan[j])
    p = man.provenance
    assert p["source"] == f"imagefolder:{assets / 'img'}" and p["resolution"] == RES and p["crop"] == "adm"
    assert p["num_classes"] == 3 and p["flip"] is True and p["skipped"] == [] and p["haste"] is None
    assert p["latent_size"] == RES // 2 and p["vae"]["latent_channels"] == 4 and p["vae"]["scale"] == [0.18215] * 4
    t = p["teachers"][0]
    assert t["field"] == "feat.0" and t["tokens"] == 4 and t["dim"] == 32 and t["codec"] == "fp32"
    assert summary["bytes"] == sum(s.nbytes for s in man.shards)


def test_bf16_codec_and_no_teacher(assets, tmp_path):
    out = tmp_path / "bf16"
    run_cli(cli_args(assets, out, "--limit", "7"))
    recs, man = read_records(out)
    assert sorted(recs) == list(range(7)) and man.fields["feat.0"].dtype == "bfloat16"
    _, teacher = _reference_models(assets)
    img = torch.from_numpy(adm_center_crop(load_rgb(sorted((assets / "img").rglob("*.*"))[3]), RES))
    f = teacher(img.permute(2, 0, 1)[None])[0]
    assert recs[3]["feat.0"].dtype == torch.bfloat16
    torch.testing.assert_close(recs[3]["feat.0"].float(), f.to(torch.bfloat16).float(), rtol=0, atol=1e-6)
    out2 = tmp_path / "pixels"
    run_cli([f"imagefolder:{assets / 'img'}", "--res", "16", "--vae", "none", "--enc-type", "none", "--out",
             str(out2), "--num-workers", "0", "--no-progress"])
    recs, man = read_records(out2)
    assert set(man.fields) == {"moments", "label"} and man.provenance["teachers"] == []
    img = adm_center_crop(load_rgb(sorted((assets / "img").rglob("*.*"))[5]), 16)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(recs[5]["moments"], torch.cat([x, torch.zeros_like(x)]))


def test_resume_after_crash_equals_uninterrupted(assets, baseline, tmp_path):
    out = tmp_path / "resume"
    args = cli_args(assets, out, "--feature-codec", "fp32", "--flip")

    class Crash(Exception):
        pass

    def crash_after_first(j):
        raise Crash(f"simulated kill after shard {j}")

    opts = Options(source=f"imagefolder:{assets / 'img'}", res=RES, out=str(out), vae=str(assets / "vae"),
                   enc_type=f"timm:local-dir:{assets / 'teacher'}", shard_size=5, batch_size=5, num_workers=0,
                   feature_codec="fp32", flip=True, progress=False, on_shard_done=crash_after_first)
    with pytest.raises(Crash):
        run(opts)
    names = os.listdir(out)
    assert "manifest.json" not in names and sum(n.endswith(".tar") for n in names) == 1
    (out / "shard-000002.tar.tmp-99999").write_bytes(b"partial garbage from a killed writer")
    summary = run_cli(args)
    assert summary["records_written"] == 7 and summary["records"] == 12  # only the 2 missing shards redone
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    got, _ = read_records(out)
    ref, _ = read_records(baseline[0])
    assert sorted(got) == sorted(ref) == list(range(12))
    for k in ref:
        assert set(got[k]) == set(ref[k])
        for f in ref[k]:
            torch.testing.assert_close(got[k][f], ref[k][f], rtol=1e-6, atol=1e-6)
    # a rerun of a finished set only re-finalizes
    assert run_cli(args)["records_written"] == 0
    # different settings into the same directory are refused, naming the settings file and the change
    import click
    with pytest.raises(click.ClickException, match=r"preprocess\.json.*feature_codec"):
        run_cli(cli_args(assets, out, "--flip"))


def test_skip_bad(assets, tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    for i in range(4):
        Image.new("RGB", (20 + i, 24), (i * 40, 10, 200)).save(data / ("a" if i % 2 else "b") / f"ok{i}.png")
    (data / "a" / "zero.jpg").write_bytes(b"")
    (data / "b" / "text.png").write_bytes(b"not an image\n" * 5)
    base = [f"imagefolder:{data}", "--res", "16", "--vae", str(assets / "vae"), "--enc-type", "none",
            "--shard-size", "4", "--num-workers", "1", "--no-progress"]
    import click
    with pytest.raises(click.ClickException, match=r"(?s)zero\.jpg.*--skip-bad"):
        run_cli(base + ["--out", str(tmp_path / "strict")])
    s = run_cli(base + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    recs, man = read_records(tmp_path / "skip")
    assert s["skipped"] == 2 and man.num_records == 4 and len(recs) == 4
    sk = man.provenance["skipped"]
    assert [Path(e["path"]).name for e in sk] == ["zero.jpg", "text.png"]
    src_paths = sorted(str(p) for p in data.rglob("*.*"))
    assert sorted(set(range(6)) - set(recs)) == [src_paths.index(e["path"]) for e in sk]


@pytest.mark.slow
def test_two_processes_equal_one(assets, tmp_path):
    """torchrun with 2 ranks (pixel space, no teacher: keeps the subprocesses' imports light)."""
    args = [f"imagefolder:{assets / 'img'}", "--res", "16", "--vae", "none", "--enc-type", "none",
            "--shard-size", "3", "--batch-size", "2", "--num-workers", "1", "--no-progress", "--flip"]
    run_cli(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "repa.preprocess.cli", *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, man = read_records(tmp_path / "two")
    ref, ref_man = read_records(tmp_path / "one")
    assert sorted(got) == sorted(ref) == list(range(12)) and len(man.shards) == 4
    for k in ref:
        for f in ("moments", "moments_flip", "label"):
            assert torch.equal(got[k][f], ref[k][f])
    assert man.provenance == ref_man.provenance
    assert "done:" in r.stdout and "12 records in 4 shards" in r.stdout  # rank 0's summary


def test_haste_residual(assets, tmp_path):
    import timm
    from timm.models import save_for_hf

    from repa.preprocess.teachers import load_teacher
    a = dict(embed_dim=32, depth=12, num_heads=2, img_size=28)
    torch.manual_seed(1)
    save_for_hf(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **a),
                str(tmp_path / "t12"), model_args=a, safe_serialization=True)
    enc = f"timm:local-dir:{tmp_path / 't12'}"
    run_cli([f"imagefolder:{assets / 'img'}", "--res", str(RES), "--vae", "none", "--enc-type", enc, "--haste",
             "--limit", "4", "--out", str(tmp_path / "h"), "--num-workers", "0", "--no-progress"])
    recs, man = read_records(tmp_path / "h")
    assert man.provenance["haste"] == {"teacher": 0, "start_block": 8, "attn_blocks": [8, 9, 10, 11]}
    assert man.fields["haste.0"].shape == (5, 32)  # CLS + 2x2 patch tokens
    teacher = load_teacher(enc, RES, "cpu")
    img = adm_center_crop(load_rgb(sorted((assets / "img").rglob("*.*"))[2]), RES)
    ref = teacher.residual_before(torch.from_numpy(img).permute(2, 0, 1)[None], 8)[0]
    torch.testing.assert_close(recs[2]["haste.0"].float(), ref.half().float())


def test_cli_conventions():
    """-h/--help, --version, defaults shown, every Options flag exactly once, no abbreviations."""
    import dataclasses

    from click.testing import CliRunner
    r = CliRunner()
    h = r.invoke(main, ["-h"])
    assert h.exit_code == 0 and h.output == r.invoke(main, ["--help"]).output
    assert "[default: 1000]" in h.output and "--no-progress" in h.output and "--no-exif-transpose" in h.output
    flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Options) if "help" in f.metadata]
    for fl in flags:
        assert fl in h.output, fl
    assert [p.name for p in main.params if p.name not in ("version", "source")] == \
        [f.name for f in dataclasses.fields(Options) if "help" in f.metadata]  # generated from the fields
    v = r.invoke(main, ["--version"])
    assert v.exit_code == 0 and v.output.startswith("repa-preprocess, version ")
    bad = r.invoke(main, ["digits", "--shard", "5"])
    assert bad.exit_code == 2 and "No such option" in bad.output and "'--shard'" in bad.output
    sig = r.invoke(main, ["digits", "--requeue-signal", "USR9", "--vae", "none", "--enc-type", "none"])
    assert sig.exit_code == 1 and "--requeue-signal: unknown signal 'USR9'" in sig.output
