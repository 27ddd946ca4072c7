"""Cheap units of the trainer: atomic checkpoint writes, RNG state round trip, EMA arithmetic, preview
decoding without a downloadable VAE, and the sampler loading a repa-train checkpoint."""
import os
import random
import warnings

import numpy as np
import pytest
import torch

from _train_shards import one_thread  # noqa: F401 (autouse fixture)
from repa.trainer import checkpoint as ckpt
from repa.trainer.ema import make_ema, update_ema
from repa.trainer.metrics import PreviewDecoder, to_grid
from repa.trainer.models import SiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
            z_dims=[16], projector_dim=32, num_classes=10)


def _save(root, step, model, **kw):
    return ckpt.save_checkpoint(root, step, model_sd=model.state_dict(), ema_sd=model.state_dict(),
                                train_state={"step": step}, config={"model": {"name": "SiT-S/2", "kwargs": TINY},
                                                                    "data": {}, "args": {}, "step": step}, **kw)


def test_crash_mid_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = SiT(**TINY)
    root = str(tmp_path / "checkpoints")
    good = _save(root, 1, model)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(root, 2, model)
    assert ckpt.latest_checkpoint(root) == good and sorted(os.listdir(root)) == ["0000001"]
    monkeypatch.undo()
    for s in (2, 3, 4):
        _save(root, s, model, keep_last=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["0000003", "0000004"]
    with pytest.raises(ckpt.CheckpointError, match="no model.safetensors"):
        ckpt.load_checkpoint(str(tmp_path))


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "s.pt")
    expect = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expect[0] == got[0] and expect[1] == got[1] and torch.equal(expect[2], got[2])


def test_ema_matches_reference_formula_including_pos_embed():
    torch.manual_seed(0)
    model = SiT(**TINY)
    ema = make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expect = {n: e.clone().mul_(0.9).add_(p, alpha=0.1) for (n, e), p in zip(ema.named_parameters(), model.parameters())}
    update_ema(ema, model, 0.9)
    assert all(torch.equal(expect[n], e) for n, e in ema.named_parameters())
    assert "pos_embed" in expect and not ema.pos_embed.requires_grad


def test_preview_decoder_without_vae_warns_and_keeps_going(monkeypatch):
    from repa.trainer import metrics as metrics_mod

    def offline(spec, device):
        raise OSError(f"{spec}: not in the local cache and HF_HUB_OFFLINE=1")
    monkeypatch.setattr(metrics_mod, "load_vae", offline)
    prov = {"vae": {"id": "stabilityai/sd-vae-ft-ema", "latent_channels": 4, "scale": [0.5] * 4, "bias": [0.0] * 4}}
    dec = PreviewDecoder(prov, "cpu")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img = dec(torch.randn(2, 4, 8, 8))
    assert img.shape == (2, 3, 8, 8) and img.min() >= -1 and img.max() <= 1
    assert any("cannot load VAE" in str(x.message) for x in w)
    pixel = PreviewDecoder({"vae": {"id": None, "latent_channels": 3, "scale": [2.0] * 3, "bias": [0.5] * 3}}, "cpu")
    z = torch.full((1, 3, 4, 4), 1.5)
    assert torch.allclose(pixel(z), torch.full((1, 3, 4, 4), 0.5))  # (z - bias) / scale: the latent is the image
    grid = to_grid(torch.zeros(5, 3, 4, 4))
    assert grid.shape == (8, 12, 3) and grid.dtype == np.uint8 and (grid[:4, :4] == 128).all()


def test_sampler_loads_a_repa_train_checkpoint(tmp_path):
    pytest.importorskip("repa.sampler.load")
    from repa.sampler.load import load_sampling_model
    torch.manual_seed(0)
    model = SiT(**TINY)
    path = _save(str(tmp_path), 7, model)
    loaded, config = load_sampling_model(path)
    assert config["source"]["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_trainer_imports_nothing_above_it():
    """Package order shards -> preprocess -> trainer -> sampler: no trainer module imports repa.sampler."""
    import ast
    from pathlib import Path
    bad = []
    for path in sorted((Path(__file__).resolve().parents[1] / "trainer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names if n.startswith(("repa.sampler", "sampler"))]
    assert bad == []


def test_stop_flag_real_signals():
    """SIGTERM / SIGUSR1 only set the flag (first one named); a SIGINT > 1 s later is an immediate KeyboardInterrupt."""
    import signal
    from repa.trainer.preempt import StopFlag, parse_signal
    assert parse_signal("USR1") == parse_signal("SIGUSR1") == signal.SIGUSR1 and parse_signal("none") is None
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopFlag("USR1").install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.set and stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same Ctrl-C seen twice (torchrun), still a flag
        stop.at -= 2  # two seconds later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode boundary of the main thread
                pass
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
