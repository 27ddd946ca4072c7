"""The REPA objective against direct implementations of docs/reference.md section 2."""
import math

import pytest
import torch

from repa.trainer.loss import REPALoss, interpolant, projection_loss, sample_time
from repa.trainer.models import build_model


def direct_interpolant(t, path):
    """docs/reference.md §2.1, element by element in float64."""
    out = []
    for tv in t.flatten().tolist():
        if path == "linear":
            out.append((1 - tv, tv, -1.0, 1.0))
        else:
            h = math.pi / 2
            out.append((math.cos(h * tv), math.sin(h * tv), -h * math.sin(h * tv), h * math.cos(h * tv)))
    return [torch.tensor([o[i] for o in out], dtype=torch.float64).reshape(t.shape) for i in range(4)]


def direct_projection_loss(zs, zs_tilde):
    """docs/reference.md §2.4 with explicit loops over encoders, samples and tokens."""
    total = 0.0
    for z, zt in zip(zs, zs_tilde):
        for b in range(z.shape[0]):
            s = 0.0
            for k in range(z.shape[1]):
                a, c = z[b, k].double(), zt[b, k].double()
                s += -float(a @ c) / (max(float(a.norm()), 1e-12) * max(float(c.norm()), 1e-12))
            total += s / z.shape[1]
    return total / (len(zs) * zs[0].shape[0])


class RecordingModel(torch.nn.Module):
    """A stand-in for SiT: v = 2·x_t + t, zs = fixed tokens; records its inputs."""

    def __init__(self, zs_tilde):
        super().__init__()
        self.zs_tilde = zs_tilde

    def forward(self, x, t, y):
        self.seen = (x.clone(), t.clone(), y.clone())
        return 2 * x + t.reshape(-1, 1, 1, 1), self.zs_tilde


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_formulas(path):
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    for got, exp in zip(interpolant(t, path), direct_interpolant(t, path)):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    a, s, da, ds = interpolant(t, path)  # the velocity is the derivative of x_t: check by finite differences
    eps = 1e-6
    a2, s2, _, _ = interpolant(t.clamp(max=1 - eps) + eps, path)
    torch.testing.assert_close((a2 - a)[:-1] / eps, da[:-1], rtol=0, atol=1e-5)
    torch.testing.assert_close((s2 - s)[:-1] / eps, ds[:-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_time_sampling_matches_formulas(path):
    g = torch.Generator().manual_seed(123)
    t = sample_time(64, "uniform", path, generator=g)
    assert t.shape == (64, 1, 1, 1) and t.dtype == torch.float32 and t.device.type == "cpu"
    assert torch.equal(t, torch.rand((64, 1, 1, 1), generator=torch.Generator().manual_seed(123)))
    t = sample_time(64, "lognormal", path, generator=torch.Generator().manual_seed(5))
    n = torch.randn((64, 1, 1, 1), generator=torch.Generator().manual_seed(5)).double()
    exp = torch.sigmoid(n) if path == "linear" else 2 / math.pi * torch.atan(n.exp())
    torch.testing.assert_close(t.double(), exp, rtol=0, atol=1e-6)
    assert 0 < t.min() and t.max() < 1
    torch.manual_seed(9)  # default CPU generator when none is given, as the reference does
    t = sample_time(4, "uniform", path)
    torch.manual_seed(9)
    assert torch.equal(t, torch.rand((4, 1, 1, 1)))


def test_projection_loss_vs_loops():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    zt = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    zt[0][1, 2] = 0.0  # a zero token: normalize's eps keeps it finite (cosine 0)
    got = projection_loss(zs, zt)
    assert got.shape == ()
    assert abs(got.item() - direct_projection_loss(zs, zt)) < 1e-6
    assert abs(projection_loss(zs, [2.5 * z for z in zs]).item() + 1) < 1e-6  # aligned -> -1
    with pytest.raises(ValueError):
        projection_loss(zs, zt[:1])


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_repa_loss_vs_direct_formula(path):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    zs = [torch.randn(3, 4, 6, generator=g)]
    zs_tilde = [torch.randn(3, 4, 6, generator=g)]
    model = RecordingModel(zs_tilde)
    y = torch.tensor([1, 2, 3])
    denoise, proj = REPALoss(path_type=path)(model, x0, y, zs, t=t, noise=noise)

    a, s, da, ds = [v.float().reshape(3, 1, 1, 1) for v in direct_interpolant(t.double(), path)]
    x_t = a * x0 + s * noise
    target = da * x0 + ds * noise
    seen_x, seen_t, seen_y = model.seen
    torch.testing.assert_close(seen_x, x_t, rtol=0, atol=1e-6)
    assert torch.equal(seen_t, t) and torch.equal(seen_y, y)
    v = 2 * x_t + t.reshape(3, 1, 1, 1)
    expected = torch.stack([((v[b] - target[b]) ** 2).mean() for b in range(3)])
    torch.testing.assert_close(denoise, expected, rtol=1e-6, atol=1e-6)
    assert abs(proj.item() - direct_projection_loss(zs, zs_tilde)) < 1e-6
    if path == "linear":
        torch.testing.assert_close(target, noise - x0, rtol=0, atol=1e-6)


def test_random_draw_order_t_then_noise():
    x0 = torch.randn(2, 4, 4, 4)
    model = RecordingModel([torch.randn(2, 4, 6)])
    torch.manual_seed(42)
    REPALoss(weighting="uniform")(model, x0, torch.tensor([0, 1]))
    torch.manual_seed(42)
    t = torch.rand((2, 1, 1, 1))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(model.seen[0], (1 - t) * x0 + t * noise, rtol=0, atol=1e-6)
    assert torch.equal(model.seen[1], t.flatten())


def test_resampled_teacher_tokens_and_no_teacher():
    g = torch.Generator().manual_seed(2)
    zt = [torch.randn(2, 4, 6, generator=g)]
    teacher = torch.randn(2, 16, 6, generator=g)
    model = RecordingModel(zt)
    x0 = torch.randn(2, 4, 4, 4)
    _, proj = REPALoss()(model, x0, torch.tensor([0, 1]), [teacher], t=torch.rand(2), noise=torch.randn_like(x0))
    grid = teacher.reshape(2, 4, 4, 6)
    pooled = ((grid[:, 0::2, 0::2] + grid[:, 1::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 1::2]) / 4)
    assert abs(proj.item() - direct_projection_loss([pooled.reshape(2, 4, 6)], zt)) < 1e-6
    _, proj = REPALoss()(model, x0, torch.tensor([0, 1]), None)
    assert proj.item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="only 'v'"):
        REPALoss(prediction="noise")
    with pytest.raises(ValueError, match="path_type"):
        REPALoss(path_type="edm")
    with pytest.raises(ValueError, match="weighting"):
        sample_time(2, "cosmap")


def test_with_sit_end_to_end_and_attn():
    torch.manual_seed(0)
    m = build_model("SiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=32, num_heads=2,
                    encoder_depth=1, projector_dim=16, z_dims=[8]).eval()
    x0 = torch.randn(2, 4, 8, 8)
    zs = [torch.randn(2, 16, 8)]
    t, noise = torch.tensor([0.3, 0.7]), torch.randn_like(x0)
    d, p, attn = REPALoss()(m, x0, torch.tensor([1, 2]), zs, t=t, noise=noise, return_attn=True)
    # the SiT outputs 0 at init, so the loss is mean((noise - x0)^2) per sample
    torch.testing.assert_close(d, ((noise - x0) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
    assert len(attn) == 1 and attn[0].shape == (2, 2, 16, 16)
    (d.mean() + 0.5 * p).backward()
    assert m.projectors[0][0].weight.grad.abs().sum() > 0
