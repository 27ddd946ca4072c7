"""Solvers vs a direct transcription of docs/reference.md §6.1-6.3, call traces, null class, per-sample SDE noise."""
import math

import pytest
import torch
import torch.nn as nn

from repa.sampler import euler_maruyama_sampler, euler_sampler
from repa.sampler.solvers import get_score_from_velocity, resolve_null_class


class TinyModel(nn.Module):
    """A small nonlinear class-conditional velocity field returning (v, zs) like SiT; records calls."""

    def __init__(self, num_classes=10, c=3, h=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_classes = num_classes
        self.emb = nn.Parameter(torch.randn(num_classes + 1, c, generator=g))
        self.w = nn.Parameter(torch.randn(c, c, generator=g) * 0.5)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((round(float(t[0]), 6), x.shape[0], x.dtype, t.dtype, y.tolist()))
        v = torch.tanh(torch.einsum("bchw,dc->bdhw", x, self.w)) * (1 + t.view(-1, 1, 1, 1))
        v = v + self.emb[y].view(x.shape[0], -1, 1, 1) * t.view(-1, 1, 1, 1) ** 2
        return v, []


def _v(model, x, t, y, dtype):
    return model(x.to(dtype), torch.full((x.shape[0],), float(t), dtype=torch.float64).to(dtype), y)[0].double()


def _guided(model, x, t, y, s, on, dtype, post=lambda v, x, t: v):
    if not on:
        return post(_v(model, x, t, y, dtype), x, t)
    cond = post(_v(model, x, t, y, dtype), x, t)
    unc = post(_v(model, x, t, torch.full_like(y, model.num_classes), dtype), x, t)
    return unc + s * (cond - unc)


def ref_ode(model, x, y, n, heun, s, lo, hi):
    """docs/reference.md §6.2 written out directly."""
    ts = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    x = x.double()
    for i in range(n):
        on = s > 1 and lo <= ts[i] <= hi
        d = _guided(model, x, ts[i], y, s, on, torch.float32)
        x1 = x + (ts[i + 1] - ts[i]) * d
        if heun and i < n - 1:
            d2 = _guided(model, x1, ts[i + 1], y, s, on, torch.float32)
            x1 = x + (ts[i + 1] - ts[i]) * (d + d2) / 2
        x = x1
    return x


def _alpha_sigma(t, path):
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    c, sn = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    return c, sn, -math.pi / 2 * sn, math.pi / 2 * c


def ref_sde(model, x, y, n, s, lo, hi, path, eps):
    """docs/reference.md §6.3 written out directly; eps[k] is the noise of interval k."""
    ts = torch.cat([torch.linspace(1.0, 0.04, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x.double()
    for k in range(n):
        t = float(ts[k])
        dt = float(ts[k + 1] - ts[k])
        a, sg, da, dsg = _alpha_sigma(t, path)
        w = 2 * t

        def drift(v, xin, _t):
            score = ((a / da) * v - xin) / (sg ** 2 - (a / da) * dsg * sg)
            return v - 0.5 * w * score
        d = _guided(model, x, t, y, s, s > 1 and lo <= t <= hi, torch.float32, post=drift)
        x = x + d * dt + (math.sqrt(w) * math.sqrt(abs(dt)) * eps[k] if k < n - 1 else 0)
    return x


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(3, 3, 4, 4)
    y = torch.tensor([1, 5, 9])
    return model, x, y


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("cfg,lo,hi", [(1.0, 0.0, 1.0), (1.8, 0.0, 0.7), (4.0, 0.3, 1.0)])
def test_ode_matches_reference_formulas(setup, heun, cfg, lo, hi):
    model, x, y = setup
    out = euler_sampler(model, x, y, num_steps=7, heun=heun, cfg_scale=cfg, guidance_low=lo, guidance_high=hi)
    ref = ref_ode(model, x, y, 7, heun, cfg, lo, hi)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("cfg,hi", [(1.0, 1.0), (1.8, 0.7)])
def test_sde_matches_reference_formulas(setup, path, cfg, hi):
    model, x, y = setup
    n = 6
    torch.manual_seed(123)
    out = euler_maruyama_sampler(model, x, y, num_steps=n, cfg_scale=cfg, guidance_high=hi, path_type=path)
    torch.manual_seed(123)  # the reference draws randn_like(x_cur) (float64) before each model call
    eps = [torch.randn_like(x.double()) for _ in range(n - 1)]
    ref = ref_sde(model, x, y, n, cfg, 0.0, hi, path, eps)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_linear_score_closed_form():
    g = torch.Generator().manual_seed(1)
    v, x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    v, x = v[None], x[None]
    t = torch.tensor([0.37], dtype=torch.float64)
    torch.testing.assert_close(get_score_from_velocity(v, x, t, "linear"), ((0.37 - 1) * v - x) / 0.37)


def test_ode_call_trace_guidance_interval(setup):
    model, x, y = setup
    model.calls.clear()
    euler_sampler(model, x, y, num_steps=5, cfg_scale=1.5, guidance_high=0.7)
    trace = [(t, b) for t, b, *_ in model.calls]
    assert trace == [(1.0, 3), (0.8, 3), (0.6, 6), (0.4, 6), (0.2, 6)]
    # model called in the latents' dtype; the doubled batch uses the model's null class (10, not 1000)
    assert all(c[2] == torch.float32 and c[3] == torch.float32 for c in model.calls)
    assert model.calls[2][4] == [1, 5, 9, 10, 10, 10]


def test_heun_trace_reuses_t_cur_decision(setup):
    model, x, y = setup
    model.calls.clear()
    euler_sampler(model, x, y, num_steps=5, heun=True, cfg_scale=1.5, guidance_high=0.7)
    trace = [(t, b) for t, b, *_ in model.calls]
    # at t_cur=0.8 CFG is off, so the Heun evaluation at t_next=0.6 is off too (NFE = 2N - 1 = 9)
    assert trace == [(1.0, 3), (0.8, 3), (0.8, 3), (0.6, 3), (0.6, 6), (0.4, 6), (0.4, 6), (0.2, 6), (0.2, 6)]


def test_sde_call_trace(setup):
    model, x, y = setup
    model.calls.clear()
    euler_maruyama_sampler(model, x, y, num_steps=5)
    assert [c[0] for c in model.calls] == [1.0, 0.76, 0.52, 0.28, 0.04]


def test_null_class_resolution(setup):
    model, x, y = setup
    assert resolve_null_class(model) == 10
    assert resolve_null_class(model, 7) == 7
    assert resolve_null_class(nn.Linear(2, 2)) == 1000  # the reference's hard-coded value
    model.calls.clear()
    euler_sampler(model, x, y, num_steps=1, cfg_scale=2.0, null_class=0)
    assert model.calls[0][4][3:] == [0, 0, 0]


def test_sde_per_sample_generators_independent_of_batch(setup):
    """With per-sample generators a sample's SDE trajectory is the same alone or in a batch."""
    model, x, y = setup

    def gens(idx):
        return [torch.Generator().manual_seed(1000 + i) for i in idx]
    full = euler_maruyama_sampler(model, x, y, num_steps=4, cfg_scale=1.5, noise_generators=gens([0, 1, 2]))
    one = euler_maruyama_sampler(model, x[1:2], y[1:2], num_steps=4, cfg_scale=1.5, noise_generators=gens([1]))
    # equal up to float32 kernel differences between batch sizes (the noise itself is identical)
    torch.testing.assert_close(full[1:2], one, rtol=1e-5, atol=1e-5)
    other = euler_maruyama_sampler(model, x, y, num_steps=4, cfg_scale=1.5, noise_generators=gens([5, 6, 7]))
    assert not torch.allclose(full, other)


def test_tiny_sit_ode(setup):
    """The solver drives a real (tiny, random) SiT from repa.trainer.models identically to the formulas."""
    from repa.trainer.models import SiT
    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
              encoder_depth=1, num_classes=10, z_dims=[8], projector_dim=16, fused_attn=False).eval()
    for p in sit.parameters():  # the init zeroes the output layers; make it non-trivial
        p.data.add_(torch.randn_like(p) * 0.05)
    _, x, y = setup
    out = euler_sampler(sit, x, y, num_steps=4, heun=True, cfg_scale=1.8, guidance_high=0.7)
    sit.num_classes = 10
    ref = ref_ode(sit, x, y, 4, True, 1.8, 0.0, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_cfg_without_null_class_is_a_clear_error():
    """A SiT trained with --cfg-prob 0 has no null row: CFG must say so instead of an index error."""
    import pytest
    import torch
    from repa.sampler import euler_sampler
    from repa.trainer.models import SiT
    m = SiT(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5,
            class_dropout_prob=0.0, z_dims=[], encoder_depth=1).eval()
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 4])
    euler_sampler(m, x, y, num_steps=2, cfg_scale=1.0)  # conditional sampling works
    with pytest.raises(ValueError, match="null-class embedding"):
        euler_sampler(m, x, y, num_steps=2, cfg_scale=1.5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_is_bitwise_the_reference_operation_order(path):
    """The sampler takes the paths from repa.trainer.loss.interpolant (one definition); the score keeps the
    reference samplers.py operation order to the bit (docs/reference.md §6.3)."""
    import math
    g = torch.Generator().manual_seed(2)
    v, x = torch.randn(2, 5, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.96 + 0.04
    tt = t.view(-1, 1, 1, 1)
    if path == "linear":
        a, s, da, ds = 1 - tt, tt, torch.ones_like(x) * -1, torch.ones_like(x)
    else:
        a, s = torch.cos(tt * math.pi / 2), torch.sin(tt * math.pi / 2)
        da, ds = -math.pi / 2 * torch.sin(tt * math.pi / 2), math.pi / 2 * torch.cos(tt * math.pi / 2)
    r = a / da
    ref = (r * v - x) / (s ** 2 - r * ds * s)
    assert torch.equal(get_score_from_velocity(v, x, t, path), ref)
