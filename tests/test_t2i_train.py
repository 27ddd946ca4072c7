"""t2i training pieces: caption draw + CFG drop, model planning from a captioned manifest."""
import os

import pytest
import torch
from safetensors.torch import save_file

from repa.shards import FieldSpec, read_manifest
from repa.trainer.mmdit import draw_context, is_t2i, load_empty_context, plan_t2i, text_fields
from repa.trainer.train import TrainConfig
from _train_shards import write_shards

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
