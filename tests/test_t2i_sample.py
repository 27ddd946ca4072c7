"""t2i sampling: parity with the official samplers_t2i.py (recorded data) and the prompts -> PNG/.npz runner."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from repa.sampler.npz import load_images_npz, read_png
from repa.sampler.t2i import prompts_from_set, read_prompts, reference_batch, run_t2i, sample_t2i
from repa.trainer.mmdit import MMDiT
from test_mmdit import _official_model, ref  # noqa: F401 (fixture)


def test_ode_heun_and_sde_match_official_samplers_t2i(ref):  # noqa: F811
    meta, tensors = ref
    model = _official_model(ref, "a")
    x, ctx, null = tensors["a.x"].float(), tensors["a.context"].float(), tensors["sample.null"].float()
    kw = meta["samplers"]["kwargs"]
    ode = sample_t2i(model, ctx, null, x, mode="ode", heun=True, **kw)
    assert ode.dtype == torch.float64
    assert (ode - tensors["sample.ode"]).abs().max().item() <= 1e-5
    torch.manual_seed(meta["samplers"]["sde_seed"])  # the official SDE noise is the global stream
    sde = sample_t2i(model, ctx, null, x, mode="sde", **kw)
    assert (sde - tensors["sample.sde"]).abs().max().item() <= 1e-5
    assert (ode - sde).abs().max().item() > 1e-2  # two different samplers were compared


def test_read_prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\n a blue square \n")
    assert read_prompts(str(p)) == ["a red circle", "a blue square"]
    p.write_text("a red circle\n\nx\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2 is empty"):
        read_prompts(str(p))
    with pytest.raises(ValueError, match="cannot read"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_prompts_from_set(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({"max_captions": 2, "captions": {
        "10": ["ten", "x"], "2": ["two"], "0": ["zero", "y", "z"]}}))
    assert prompts_from_set(str(tmp_path)) == [(0, "zero"), (2, "two"), (10, "ten")]
    assert prompts_from_set(str(tmp_path), 2) == [(0, "zero"), (2, "two")]
    with pytest.raises(ValueError, match="has only 3 captioned records"):
        prompts_from_set(str(tmp_path), 4)
    with pytest.raises(ValueError, match="no captions.json"):
        prompts_from_set(str(tmp_path / "nope"))
    drawn = prompts_from_set(str(tmp_path), 2, seed=3)
    assert drawn == prompts_from_set(str(tmp_path), 2, seed=3) and len({k for k, _ in drawn}) == 2
    caps = {0: ["zero", "y", "z"], 2: ["two"], 10: ["ten", "x"]}
    assert all(c in caps[k] for k, c in drawn)


def test_reference_batch_is_the_adm_crop(tmp_path):
    from repa.preprocess.captions import CaptionsFolderSource
    from repa.preprocess.crop import adm_center_crop
    from test_t2i_preprocess import make_captions_folder
    src = CaptionsFolderSource(make_captions_folder(str(tmp_path / "set"), n=3), "captions:set")
    npz = reference_batch(src, 16, str(tmp_path / "ref.npz"))
    images = load_images_npz(npz, mmap=False)
    assert images.shape == (3, 16, 16, 3)
    assert np.array_equal(images[2], adm_center_crop(src.decode(src.get(2))[0], 16))


def _t2i_checkpoint(folder, clip: str) -> str:
    """A repa-train-style checkpoint folder of a pixel-space MMDiT (random weights)."""
    kwargs = dict(input_size=8, patch_size=2, in_channels=3, depth=2, context_dim=32, z_dims=[8], projector_dim=16,
                  encoder_depth=1)
    torch.manual_seed(0)
    model = MMDiT(**kwargs)
    os.makedirs(folder)
    save_file(model.state_dict(), os.path.join(folder, "ema.safetensors"))
    config = {"model": {"name": "MMDiT-d2/2", "kwargs": kwargs},
              "data": {"vae": {"id": None, "latent_channels": 3, "scale": [1.0] * 3, "bias": [0.0] * 3},
                       "text": {"text_encoder": {"name": clip, "id": clip}}}, "args": {"path_type": "linear"}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def test_run_t2i_pngs_npz_index_and_resume(tmp_path):
    pytest.importorskip("transformers")
    from test_t2i_preprocess import make_tiny_clip
    clip = make_tiny_clip(str(tmp_path / "clip"))
    ckpt = _t2i_checkpoint(str(tmp_path / "ckpt"), clip)
    prompts = ["a red circle", "a blue square", "a green circle"]
    npz = run_t2i(ckpt, prompts, str(tmp_path / "samples"), num_steps=3, cfg_scale=2.0, batch_size=2, name="run")
    images = load_images_npz(npz, mmap=False)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    folder = tmp_path / "samples" / "run"
    index = json.loads((folder / "prompts.json").read_text())
    assert index["prompts"] == {"0": "a red circle", "1": "a blue square", "2": "a green circle"}
    assert np.array_equal(read_png(str(folder / "000001.png")), images[1])
    # batch size does not change a sample; a rerun only fills in the missing PNG
    os.remove(folder / "000002.png")
    run_t2i(ckpt, prompts, str(tmp_path / "samples"), num_steps=3, cfg_scale=2.0, batch_size=1, name="run")
    assert np.array_equal(load_images_npz(npz, mmap=False), images)
    with pytest.raises(ValueError, match="holds samples made with different settings"):
        run_t2i(ckpt, prompts[:2], str(tmp_path / "samples"), num_steps=3, cfg_scale=2.0, name="run")
    os.makedirs(tmp_path / "samples" / "foreign")
    (tmp_path / "samples" / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files not written by repa-sample"):  # never writes into it
        run_t2i(ckpt, prompts, str(tmp_path / "samples"), num_steps=3, name="foreign")
    assert os.listdir(tmp_path / "samples" / "foreign") == ["notes.txt"]
    # CFG against the empty caption changes the sample
    other = run_t2i(ckpt, prompts, str(tmp_path / "samples"), num_steps=3, cfg_scale=1.0, name="nocfg")
    assert not np.array_equal(load_images_npz(other, mmap=False), images)


def test_repa_sample_prompts_flags(tmp_path):
    pytest.importorskip("transformers")
    from repa.sampler.sample_cli import main
    from test_t2i_preprocess import make_tiny_clip
    clip = make_tiny_clip(str(tmp_path / "clip"))
    ckpt = _t2i_checkpoint(str(tmp_path / "ckpt"), clip)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    common = ["--ckpt", ckpt, "--num-steps", "2", "--cfg-scale", "3", "--sample-dir", str(tmp_path / "s")]
    npz = main([*common, "--prompts", str(tmp_path / "p.txt"), "--mode", "sde"])
    assert load_images_npz(npz, mmap=False).shape == (2, 8, 8, 3)
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "captions.json").write_text(json.dumps({"max_captions": 1, "captions": {
        "0": ["a red circle"], "1": ["a blue square"], "2": ["a green circle"]}}))
    npz = main([*common, "--prompts-from", str(tmp_path / "set"), "--num-fid-samples", "2", "--global-seed", "1"])
    index = json.loads(open(os.path.join(npz[:-4], "prompts.json")).read())
    assert len(index["prompts"]) == 2 and all(v["key"] in (0, 1, 2) for v in index["prompts"].values())
    with pytest.raises(SystemExit, match="not both"):
        main([*common, "--prompts", str(tmp_path / "p.txt"), "--prompts-from", str(tmp_path / "set")])
    with pytest.raises(SystemExit, match="is not a text-to-image MMDiT"):
        bad = tmp_path / "ckpt2"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"model": {"name": "SiT-B/2", "kwargs": {}}}))
        main(["--ckpt", str(bad), "--prompts", str(tmp_path / "p.txt")])
