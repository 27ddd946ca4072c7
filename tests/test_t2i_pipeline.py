"""End to end on a tiny captioned set: repa-preprocess (captions:/coco:) -> repa-train (MMDiT) -> repa-sample --prompts."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from repa.preprocess.pipeline import Options, PreprocessError, run  # noqa: E402
from repa.preprocess.text_encoder import load_text_encoder  # noqa: E402
from repa.shards import ShardStream, read_manifest  # noqa: E402
from test_t2i_preprocess import make_captions_folder, make_coco, make_tiny_clip  # noqa: E402


def _opts(source, out, clip, **kw):
    base = dict(res=16, out=str(out), vae="none", enc_type="none", text_encoder=clip, max_captions=2, shard_size=4,
                num_workers=0, progress=False, device="cpu")
    return Options(source=source, **{**base, **kw})


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def test_captions_source_to_shards_to_training_to_samples(tmp_path, clip):
    root = make_captions_folder(str(tmp_path / "set"), n=6)
    out = tmp_path / "shards"
    summary = run(_opts(f"captions:{root}", out, clip), echo=lambda m: None)
    assert summary["records"] == 6
    m = read_manifest(str(out))
    assert list(m.fields)[-3:] == ["text.0", "text.1", "num_captions"]
    assert m.fields["text.0"].shape == (77, 32) and m.fields["text.0"].codec == "bf16"
    text = m.provenance["text"]
    assert text["max_captions"] == 2 and text["captions_total"] == 12 and text["captions_truncated"] == 2
    assert text["text_encoder"]["weights_sha256"] == load_text_encoder(clip).weights_sha256()
    side = json.loads((out / "captions.json").read_text())["captions"]
    enc = load_text_encoder(clip)
    batch = next(iter(ShardStream(str(out), 6, shuffle=False)))
    for i, key in enumerate(batch["key"].tolist()):
        caps = side[str(key)]
        assert batch["num_captions"][i].item() == min(2, len(caps))
        want = enc.encode(caps[:1] + [""])  # slot 0 = caption 0; slot 1 = caption 1 or the empty caption
        if len(caps) > 1:
            want[1] = enc.encode([caps[1]])[0]
        assert torch.equal(batch["text.0"][i], want[0].bfloat16()) and torch.equal(batch["text.1"][i], want[1].bfloat16())
    # a rerun of the same command finds everything done; other text settings are refused
    assert run(_opts(f"captions:{root}", out, clip), echo=lambda m: None)["records_written"] == 0
    with pytest.raises(PreprocessError, match="max_captions"):
        run(_opts(f"captions:{root}", out, clip, max_captions=3), echo=lambda m: None)
    index = os.path.join(root, "captions.jsonl")
    with open(index) as f:
        edited = f.read().replace("a red circle", "a red disc")
    with open(index, "w") as f:
        f.write(edited)
    with pytest.raises(PreprocessError, match="captions_sha256"):  # edited captions: another dataset
        run(_opts(f"captions:{root}", out, clip), echo=lambda m: None)

    from repa.trainer.train import TrainConfig, train
    res = train(TrainConfig(shards=str(out), output_dir=str(tmp_path / "exps"), exp_name="t2i", model="MMDiT-d2/2",
                            model_kwargs={"projector_dim": 16}, encoder_depth=1, proj_coeff=0.0, batch_size=4,
                            max_train_steps=2, checkpointing_steps=2, mixed_precision="no", num_workers=0,
                            sampling_steps=0, progress=False))
    assert res["step"] == 2
    from repa.sampler.npz import load_images_npz
    from repa.sampler.t2i import run_t2i
    npz = run_t2i(res["checkpoint"], ["a red circle", "a blue square"], str(tmp_path / "samples"), num_steps=2,
                  cfg_scale=2.0)
    images = load_images_npz(npz, mmap=False)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_coco_source_and_refusals(tmp_path, clip):
    root = make_coco(str(tmp_path / "coco"), n=5)
    out = tmp_path / "shards"
    summary = run(_opts(f"coco:{root}", out, clip, split="train", max_captions=None), echo=lambda m: None)
    assert summary["records"] == 5
    m = read_manifest(str(out))
    assert [f for f in m.fields if f.startswith("text.")] == [f"text.{i}" for i in range(5)]  # COCO default: 5
    assert m.provenance["num_classes"] == 1 and m.provenance["text"]["captions_total"] == 9
    run(_opts(f"coco:{root}", tmp_path / "lim", clip, limit=2), echo=lambda m: None)
    side = json.loads((tmp_path / "lim" / "captions.json").read_text())["captions"]
    assert sorted(side) == ["0", "1"]  # --limit 2: the sidecar holds the records' captions only
    with pytest.raises(Exception, match="need a captioned source"):
        run(_opts("digits", tmp_path / "digits", clip), echo=lambda m: None)
    with pytest.raises(Exception, match=r"captions_val2014.json not found"):
        run(_opts(f"coco:{root}", tmp_path / "val", clip, split="val2014"), echo=lambda m: None)


def _hf_parquet(folder, captions) -> str:
    import datasets
    from test_t2i_preprocess import shape_image
    images = [shape_image(c, s) for c, s in [("red", "circle"), ("blue", "square"), ("green", "circle")]]
    os.makedirs(os.path.join(folder, "data"))
    datasets.Dataset.from_dict({"image": images[: len(captions)], "text": captions}).to_parquet(
        os.path.join(folder, "data", "train-00000.parquet"))
    return folder


@pytest.mark.slow
def test_repa_preprocess_cli_hf_captions_and_errors(tmp_path, clip):
    """A real process exits 0 with the records; a missing annotation file is refused naming it and the fix."""
    import subprocess
    import sys
    src = _hf_parquet(str(tmp_path / "hf"), [["a red circle", "red circle"], ["a blue square"], ["a green circle"]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hfhome")}
    cmd = [sys.executable, "-m", "repa.preprocess", f"hf:{src}", "--caption-column", "text", "--text-encoder", clip,
           "--vae", "none", "--enc-type", "none", "--res", "16", "--num-workers", "0", "--no-progress",
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = read_manifest(str(tmp_path / "out"))
    assert m.num_records == 3 and m.provenance["text"]["captions_total"] == 4
    assert m.provenance["source"] == f"hf:{src}"
    os.makedirs(tmp_path / "coco" / "train2014")
    import click
    from repa.preprocess.cli import main
    with pytest.raises(click.ClickException) as e:
        main.main([f"coco:{tmp_path / 'coco'}", "--text-encoder", clip, "--vae", "none", "--enc-type", "none",
                   "--res", "16", "--out", str(tmp_path / "o2")], standalone_mode=False)
    msg = e.value.format_message()
    assert "annotations/captions_train.json not found" in msg and "annotations_trainval2014.zip" in msg
    assert not os.path.exists(tmp_path / "o2" / "manifest.json")


def test_hf_caption_column_errors(tmp_path):
    from repa.preprocess.captions import HFCaptionSource
    from repa.preprocess.sources import SourceError
    src = _hf_parquet(str(tmp_path / "hf"), [["a red circle"], []])
    with pytest.raises(SourceError, match=r"gives image 'hf:.*#1' no caption strings"):
        HFCaptionSource(src, f"hf:{src}", "text")
    with pytest.raises(SourceError, match=r"column 'caption' not found .*pass --caption-column"):
        HFCaptionSource(src, f"hf:{src}", "caption")


def test_caption_crop_uvit_is_uvits_center_crop(tmp_path, clip):
    from PIL import Image
    from repa.preprocess.captions import uvit_center_crop
    from repa.preprocess.crop import adm_center_crop
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # 40 wide, 24 high
    want = np.asarray(Image.fromarray(np.asarray(img)[:, 8:32]).resize((16, 16), Image.LANCZOS))
    got = uvit_center_crop(img, 16)
    assert np.array_equal(got, want)
    assert np.array_equal(adm_center_crop(Image.fromarray(got), 16), got)  # the pipeline's crop is then a no-op
    root = tmp_path / "set"
    root.mkdir()
    img.save(root / "a.png")
    (root / "captions.jsonl").write_text(json.dumps({"file": "a.png", "captions": ["a red circle"]}) + "\n")
    out = tmp_path / "out"
    run(_opts(f"captions:{root}", out, clip, caption_crop="uvit"), echo=lambda m: None)
    m = read_manifest(str(out))
    assert m.provenance["crop"] == "uvit"
    rec = next(iter(ShardStream(str(out), 1, shuffle=False)))
    pixels = rec["moments"][0, :3].permute(1, 2, 0).numpy()  # --vae none: moments = [image in [-1, 1] | 0]
    assert np.allclose(pixels, want.astype(np.float32) / 127.5 - 1, atol=1e-6)
    with pytest.raises(Exception, match="need a captioned source"):
        run(_opts("digits", tmp_path / "d", None, text_encoder=None, max_captions=None, caption_crop="uvit"),
            echo=lambda m: None)
