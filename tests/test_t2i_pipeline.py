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
    with pytest.raises(Exception, match="need a captioned source"):
        run(_opts("digits", tmp_path / "digits", clip), echo=lambda m: None)
    with pytest.raises(Exception, match=r"captions_val2014.json not found"):
        run(_opts(f"coco:{root}", tmp_path / "val", clip, split="val2014"), echo=lambda m: None)
