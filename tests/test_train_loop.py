"""repa-train loop: bitwise resume, checkpoints, keep-last-K, dimension checks, non-finite stop, HASTE switch.

All runs are in-process ``train()`` calls on a tiny SiT (depth 2, width 32) and tiny shard sets written with
the real shards writer (tests/_train_shards.py).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from _train_shards import tiny_train_config, TINY_MODEL, one_thread, write_shards  # noqa: F401 (autouse fixture)
from repa.trainer import train as train_mod
from repa.trainer.checkpoint import list_checkpoints, load_checkpoint
from repa.trainer.metrics import read_jsonl
from repa.trainer.models import SiT
from repa.trainer.train import NonFiniteLossError, TrainConfig, resolve_shards, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards") / "set"), n=48)


def cfg(shards, out, name, **kw):
    return tiny_train_config(shards, out, name, **kw)


def weights(ckpt_dir):
    return load_file(os.path.join(ckpt_dir, "model.safetensors")), load_file(os.path.join(ckpt_dir, "ema.safetensors"))


def assert_bitwise(a, b):
    for wa, wb in zip(weights(a), weights(b)):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise(shards, tmp_path, workers):
    """Stop at step 2, resume with --resume auto to step 4 == uninterrupted 4 steps, to the bit (model and
    EMA), with and without DataLoader workers; accumulation 2 exercises no_sync and the micro-batch split."""
    kw = dict(num_workers=workers, gradient_accumulation_steps=2)
    full = train(cfg(shards, tmp_path, "full", **kw))
    half = train(cfg(shards, tmp_path, "part", max_train_steps=2, **kw))
    assert half["step"] == 2
    resumed = train(cfg(shards, tmp_path, "part", resume="auto", **kw))
    assert full["step"] == resumed["step"] == 4
    assert_bitwise(full["checkpoint"], resumed["checkpoint"])
    losses = [r["loss"] for r in read_jsonl(os.path.join(tmp_path, "full", "metrics.jsonl"))]
    assert losses == [r["loss"] for r in read_jsonl(os.path.join(tmp_path, "part", "metrics.jsonl"))]
    assert len(set(losses)) == 4  # different batches / draws every step


def test_checkpoint_contents_and_keep_last(shards, tmp_path):
    out = train(cfg(shards, tmp_path, "k", checkpointing_steps=1, keep_last=2, ema_decay=0.5))
    root = os.path.join(tmp_path, "k", "checkpoints")
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["0000003", "0000004"]
    assert not [d for d in os.listdir(root) if ".tmp-" in d]
    ck = load_checkpoint(out["checkpoint"])  # train_state via torch.load(weights_only=True)
    conf = ck["config"]
    assert conf["step"] == 4 and ck["train_state"]["step"] == 4
    assert conf["data"]["latent_size"] == 8 and conf["data"]["vae"]["scale"] == [0.5] * 4
    assert TrainConfig(**conf["args"]) == cfg(shards, tmp_path, "k", checkpointing_steps=1, keep_last=2, ema_decay=0.5)
    kwargs = conf["model"]["kwargs"]
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["z_dims"], kwargs["num_classes"]) == (8, 4, [16], 10)
    model = SiT(**kwargs)
    model.load_state_dict(ck["model"], strict=True)  # keys exactly the SiT's
    assert set(ck["ema"]) == set(model.state_dict())
    # EMA decay 0.5 over 4 steps: the EMA moved away from the init but is not the model
    ema_w, model_w = ck["ema"]["final_layer.linear.weight"], ck["model"]["final_layer.linear.weight"]
    assert ema_w.abs().sum() > 0 and not torch.equal(ema_w, model_w)
    ts = ck["train_state"]
    assert ts["world_size"] == 1 and len(ts["ranks"]) == 1 and ts["ranks"][0]["loader"]["batches"] == 4
    assert len(ts["optimizer"]["state"]) > 0
    records = read_jsonl(os.path.join(tmp_path, "k", "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "proj_loss", "grad_norm", "lr", "samples_per_s"} <= set(records[0])
    assert all(r["lr"] == 1e-4 for r in records)


def test_dimension_mismatch_fails_before_step_1(shards, tmp_path):
    with pytest.raises(ValueError, match=r"patch size 3 does not divide the latent size 8.*--shards"):
        train(cfg(shards, tmp_path, "bad", model_kwargs={**TINY_MODEL, "patch_size": 3}))
    with pytest.raises(ValueError, match=r"input_size=16 .*implies 8"):
        train(cfg(shards, tmp_path, "bad", model_kwargs={**TINY_MODEL, "input_size": 16}))
    with pytest.raises(ValueError, match=r"--batch-size 6 .*divisible"):
        train(cfg(shards, tmp_path, "bad", batch_size=6, gradient_accumulation_steps=4))
    assert not os.path.exists(os.path.join(tmp_path, "bad", "checkpoints"))


def test_teacher_grid_resampled_for_patch4(shards, tmp_path):
    """SiT-*/4 on an 8x8 latent has 2x2 tokens, the teacher 4x4: tokens are resampled, training runs."""
    out = train(cfg(shards, tmp_path, "p4", model="SiT-S/4", max_train_steps=1))
    rec = read_jsonl(os.path.join(tmp_path, "p4", "metrics.jsonl"))[0]
    assert out["step"] == 1 and -1 <= rec["proj_loss"] <= 1


def test_non_finite_loss_stops_with_step_and_checkpoint(shards, tmp_path):
    good = train(cfg(shards, tmp_path, "nan", max_train_steps=2))
    nan_shards = write_shards(str(tmp_path / "nan_shards"), n=48, extra_data=None, seed=1)
    # poison every record's moments after writing: same layout, NaN latents
    from repa.shards import FieldSpec, ShardSetWriter, finalize_manifest, read_manifest
    bad = str(tmp_path / "bad_shards")
    m = read_manifest(nan_shards)
    with ShardSetWriter(bad, m.fields, records_per_shard=16) as w:
        for key in range(48):
            w.write(key, {"moments": torch.full((8, 8, 8), float("nan")), "label": torch.tensor(0),
                          "feat.0": torch.zeros(16, 16)})
    finalize_manifest(bad, m.fields, m.provenance, expected_records=48)
    # resuming onto another shard set is refused (tests/test_train_flags.py); the last good checkpoint named in
    # the message is tested with a record going bad mid-run in tests/faults/test_bad_numbers.py
    with pytest.raises(ValueError, match="a different shard set"):
        train(cfg(bad, tmp_path, "nan", resume="auto"))
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(tmp_path, "nan", "checkpoints"))] == ["0000002"]
    assert good["step"] == 2
    with pytest.raises(NonFiniteLossError, match="step 1 .*no checkpoint was saved yet"):
        train(cfg(bad, tmp_path, "nan_fresh"))
    assert FieldSpec  # imported for the writer


def test_resolve_shards_parent_dir(tmp_path):
    write_shards(str(tmp_path / "one" / "imagenet-256"), n=16)
    assert resolve_shards(str(tmp_path / "one")) == str(tmp_path / "one" / "imagenet-256")
    write_shards(str(tmp_path / "two" / "a"), n=16)
    write_shards(str(tmp_path / "two" / "b"), n=16)
    with pytest.raises(ValueError, match=r"several shard sets \['a', 'b'\]"):
        resolve_shards(str(tmp_path / "two"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        resolve_shards(str(tmp_path / "two" / "a" / ".."  / ".." ))


# ---------------------------------------------------------------- HASTE

@pytest.fixture(scope="module")
def haste_shards(tmp_path_factory):
    """Tiny DINOv2-architecture teacher (timm, random weights, 4 blocks, 2 heads, 4x4 grid at R=64) and
    shards with its residual entering block 2; attention aligned on teacher blocks 2, 3."""
    import timm
    from timm.models import save_for_hf
    from repa.shards import FieldSpec
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    args = dict(img_size=56, depth=4, embed_dim=64, num_heads=2)
    save_for_hf(timm.create_model("vit_small_patch14_dinov2", pretrained=False, **args), str(d),
                model_args=args, safe_serialization=True)
    meta = [{"name": f"timm:local-dir:{d}", "id": None, "tokens": 16, "dim": 64, "grid": [4, 4],
             "depth": 4, "heads": 2, "prefix_tokens": 1, "codec": "bf16"}]
    out = str(tmp_path_factory.mktemp("hshards") / "set")
    return write_shards(out, n=32, teachers=((16, 64),), teacher_meta=meta,
                        haste={"teacher": 0, "start_block": 2, "attn_blocks": [2, 3]},
                        extra_fields={"haste.0": FieldSpec((17, 64), "float16", "fp16")},
                        extra_data=lambda key, g: {"haste.0": torch.randn(17, 64, generator=g)})


def test_haste_switch_and_resume(haste_shards, tmp_path, monkeypatch):
    fields_seen = []
    real = train_mod.build_loader
    monkeypatch.setattr(train_mod, "build_loader", lambda c, u, fields, *a: fields_seen.append(fields) or real(c, u, fields, *a))
    kw = dict(model_kwargs={**TINY_MODEL, "num_heads": 2}, encoder_depth=2, early_stop_point=2, batch_size=4)
    full = train(cfg(haste_shards, tmp_path, "h", **kw))
    recs = read_jsonl(os.path.join(tmp_path, "h", "metrics.jsonl"))
    assert all(r["attn_loss"] > 0 and r["proj_loss"] != 0 for r in recs[:2])      # phase I: steps 1, 2
    assert all(r["attn_loss"] == 0 and r["proj_loss"] == 0 for r in recs[2:])     # phase II: steps 3, 4
    # phase I reads the residual (not the cached feat.0: the online teacher gives it); phase II only latents
    assert fields_seen == [["moments", "haste.0"], ["moments"]]
    fields_seen.clear()
    train(cfg(haste_shards, tmp_path, "h2", max_train_steps=2, **kw))
    resumed = train(cfg(haste_shards, tmp_path, "h2", resume="auto", **kw))
    assert fields_seen == [["moments", "haste.0"], ["moments"]]  # the resumed run starts in phase II
    assert_bitwise(full["checkpoint"], resumed["checkpoint"])
    # the projector got no gradient after the switch (AdamW skips it, like the reference)
    a, b = load_file(os.path.join(tmp_path, "h", "checkpoints", "0000002", "model.safetensors")), weights(full["checkpoint"])[0]
    assert torch.equal(a["projectors.0.0.weight"], b["projectors.0.0.weight"])
    assert not torch.equal(a["final_layer.linear.weight"], b["final_layer.linear.weight"])
    assert json.load(open(os.path.join(full["checkpoint"], "config.json")))["args"]["early_stop_point"] == 2


def test_grad_checkpointing_gives_the_same_weights(shards, tmp_path, monkeypatch):
    from repa.trainer import models as trainer_models
    calls = []
    real = trainer_models.checkpoint
    monkeypatch.setattr(trainer_models, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = train(cfg(shards, tmp_path, "plain", max_train_steps=2))
    assert not calls
    ckpt_run = train(cfg(shards, tmp_path, "gc", max_train_steps=2, grad_checkpointing=True))
    assert len(calls) == 2 * 2  # 2 blocks x 2 steps went through activation checkpointing
    for a, b in zip(weights(plain["checkpoint"]), weights(ckpt_run["checkpoint"])):
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
