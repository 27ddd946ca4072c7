"""t2i training pieces: caption draw + CFG drop, model planning from a captioned manifest."""
import os

import pytest
import torch
from safetensors.torch import save_file

from repa.shards import FieldSpec, read_manifest
from repa.trainer.mmdit import draw_context, is_t2i, load_empty_context, plan_t2i, text_fields
from repa.trainer.checkpoint import load_checkpoint
from repa.trainer.metrics import read_jsonl
from repa.trainer.mmdit import MMDiT
from repa.trainer.train import TrainConfig, train
from _train_shards import one_thread, tiny_train_config, write_shards  # noqa: F401 (autouse fixture)
from test_mmdit import _official_model, ref  # noqa: F401 (fixture)
from safetensors.torch import load_file

CTX = (5, 32)  # tokens x hidden of the test "text encoder"


def t2i_fields(k: int = 3) -> dict:
    fields = {f"text.{i}": FieldSpec(CTX, "bfloat16", "bf16") for i in range(k)}
    fields["num_captions"] = FieldSpec((), "int64", "raw")
    return fields


def t2i_data(k: int = 3):
    """Record key's caption i is filled with key + i/10 (bf16-exact enough to identify), count 1 + key % k."""
    def data(key, g):
        out = {f"text.{i}": torch.full(CTX, float(key) + i / 8) for i in range(k)}
        out["num_captions"] = torch.tensor(1 + key % k)
        return out
    return data


def write_t2i_shards(out: str, n: int = 32, k: int = 3, **kw) -> str:
    write_shards(out, n, extra_fields=t2i_fields(k), extra_data=t2i_data(k), **kw)
    save_file({"empty_context": torch.full(CTX, -1.0)}, os.path.join(out, "empty_context.safetensors"))
    return out


def _batch(counts):
    B = len(counts)
    batch = {f"text.{i}": torch.stack([torch.full(CTX, b + i / 8) for b in range(B)]) for i in range(3)}
    batch["num_captions"] = torch.tensor(counts)
    batch["key"] = torch.arange(100, 100 + B)
    return batch


def test_draw_context_picks_a_real_caption_and_drops_to_empty():
    empty = torch.full(CTX, -1.0)
    counts = [1, 2, 3, 3] * 500
    torch.manual_seed(0)
    ctx = draw_context(_batch(counts), ["text.0", "text.1", "text.2"], empty, cfg_prob=0.1)
    value = ctx[:, 0, 0]
    dropped = value == -1
    slot = (value - torch.arange(len(counts))) * 8  # which caption was taken
    assert abs(dropped.float().mean().item() - 0.1) < 0.03
    kept, c = slot[~dropped].round().long(), torch.tensor(counts)[~dropped]
    assert (kept >= 0).all() and (kept < c).all()  # never an unused slot
    for n in (2, 3):
        freq = torch.bincount(kept[c == n], minlength=n).float() / (c == n).sum()
        assert torch.allclose(freq, torch.full((n,), 1 / n), atol=0.05)
    torch.manual_seed(0)  # same RNG state, same draws
    assert torch.equal(draw_context(_batch(counts), ["text.0", "text.1", "text.2"], empty, 0.1), ctx)
    assert (draw_context(_batch([3, 1]), ["text.0", "text.1", "text.2"], empty, 1.0) == -1).all()


def test_draw_context_refuses_records_without_captions():
    with pytest.raises(ValueError, match=r"records \[101\] have no caption"):
        draw_context(_batch([1, 0]), ["text.0", "text.1", "text.2"], torch.zeros(CTX), 0.1)


def test_plan_t2i_from_manifest(tmp_path):
    url = write_t2i_shards(str(tmp_path / "set"), n=8)
    m = read_manifest(url)
    assert is_t2i(m) and text_fields(m) == ["text.0", "text.1", "text.2"]
    with pytest.raises(ValueError, match="holds caption features .* --model MMDiT-B/2"):
        plan_t2i(TrainConfig(shards=url), m, url)
    kw = plan_t2i(TrainConfig(shards=url, model="MMDiT-d2/2", encoder_depth=1), m, url)
    assert (kw["depth"], kw["input_size"], kw["in_channels"], kw["context_dim"], kw["z_dims"]) == (2, 8, 4, 32, [16])
    with pytest.raises(ValueError, match="--model-kwargs sets context_dim=768"):
        plan_t2i(TrainConfig(shards=url, model="MMDiT-d2/2", encoder_depth=1, model_kwargs={"context_dim": 768}),
                 m, url)
    with pytest.raises(ValueError, match=r"--encoder-depth 3 be in \[1, 2\]"):
        plan_t2i(TrainConfig(shards=url, model="MMDiT-d2/2", encoder_depth=3), m, url)
    assert torch.equal(load_empty_context(url), torch.full(CTX, -1.0))
    os.remove(os.path.join(url, "empty_context.safetensors"))
    with pytest.raises(FileNotFoundError, match="empty_context.safetensors is missing"):
        load_empty_context(url)


def test_t2i_step_loss_matches_official_train_t2i(ref):  # noqa: F811
    """repa-train's compute_loss on the t2i path == the official SILoss of train_t2i.py, same draws."""
    from repa.trainer.loss import REPALoss
    from repa.trainer.mmdit import ContextAsLabels
    from repa.trainer.train import loss_from_latents
    meta, tensors = ref
    model = _official_model(ref, "a")
    x, ctx, z = tensors["a.x"].float(), tensors["a.context"].float(), tensors["loss.z"]
    torch.manual_seed(meta["loss"]["seed"])  # the official draw order: t (CPU rand), then the noise
    t, noise = torch.rand(2, 1, 1, 1), torch.randn_like(x)
    batch = {"label": ctx, "feat.0": z}  # x0 = x: the official step feeds the scaled latents directly
    with torch.no_grad():
        loss, parts = loss_from_latents(ContextAsLabels(model), REPALoss(), batch, x, feats=["feat.0"],
                                        proj_coeff=0.5, t=t, noise=noise)
    official = sum(meta["loss"]["denoising"]) / 2 + 0.5 * meta["loss"]["proj"]
    assert loss.item() == pytest.approx(official, abs=1e-5)
    assert parts[1].item() == pytest.approx(meta["loss"]["proj"], abs=1e-6)


@pytest.fixture(scope="module")
def t2i_shards(tmp_path_factory):
    return write_t2i_shards(str(tmp_path_factory.mktemp("t2i") / "set"), n=32)


def _cfg(url, out, name, **kw):
    base = dict(model="MMDiT-d2/2", model_kwargs={"projector_dim": 32}, encoder_depth=1, cfg_prob=0.5)
    return tiny_train_config(url, out, name, **{**base, **kw})


def test_t2i_train_resume_is_bitwise_across_caption_draws(t2i_shards, tmp_path):
    full = train(_cfg(t2i_shards, tmp_path, "full"))
    half = train(_cfg(t2i_shards, tmp_path, "part", max_train_steps=2))
    resumed = train(_cfg(t2i_shards, tmp_path, "part", resume="auto"))
    assert half["step"] == 2 and full["step"] == resumed["step"] == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(os.path.join(full["checkpoint"], name)), load_file(os.path.join(resumed["checkpoint"], name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [r["loss"] for r in read_jsonl(os.path.join(tmp_path, "full", "metrics.jsonl"))]
    assert losses == [r["loss"] for r in read_jsonl(os.path.join(tmp_path, "part", "metrics.jsonl"))]
    ck = load_checkpoint(full["checkpoint"])
    assert ck["config"]["model"]["name"] == "MMDiT-d2/2" and ck["config"]["model"]["kwargs"]["context_dim"] == 32
    MMDiT(**ck["config"]["model"]["kwargs"]).load_state_dict(ck["ema"], strict=True)
    # the captions reach the model: without CFG drops the same seed gives other losses
    other = train(_cfg(t2i_shards, tmp_path, "nodrop", cfg_prob=0.0, max_train_steps=2))
    assert [r["loss"] for r in read_jsonl(os.path.join(other["exp_dir"], "metrics.jsonl"))] != losses[:2]


def test_t2i_preview_and_refusals(t2i_shards, tmp_path):
    out = train(_cfg(t2i_shards, tmp_path, "prev", max_train_steps=2, sampling_steps=2, num_preview=4,
                     preview_steps=2))
    png = os.path.join(out["exp_dir"], "samples", "0000002.png")
    assert os.path.getsize(png) > 0
    from repa.trainer.guards import ConfigError
    with pytest.raises(ConfigError, match="holds caption features"):
        train(tiny_train_config(t2i_shards, tmp_path, "sit", encoder_depth=1))
    with pytest.raises(ConfigError, match="--haste is not supported with MMDiT"):
        train(_cfg(t2i_shards, tmp_path, "haste", haste=True))
