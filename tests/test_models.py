"""SiT parity with docs/reference.md section 1: embeddings, parameter counts, state-dict layout, forward semantics."""
import math

import pytest
import torch

from repa.trainer.models import (SiT, SiT_models, TimestepEmbedder, build_model, get_2d_sincos_pos_embed,
                            model_config, resample_tokens)

TINY = dict(input_size=8, num_classes=10, depth=3, hidden_size=64, num_heads=4, encoder_depth=2,
            projector_dim=32, z_dims=[24])


def tiny(**kw):
    return build_model("SiT-S/2", **dict(TINY, **kw))


def randomize_(model, seed=0, std=0.05):
    """Give every zero-initialised parameter (adaLN, final layer) random values so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def expected_state_dict_shapes(depth, D, p, z_dims, C=4, T=256, num_classes=1000, proj=2048, mlp=4):
    """docs/reference.md §1.2, written out independently of trainer/models.py."""
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (mlp * D, D), b + "mlp.fc1.bias": (mlp * D,),
            b + "mlp.fc2.weight": (D, mlp * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    for k, z in enumerate(z_dims):
        b = f"projectors.{k}."
        shapes.update({b + "0.weight": (proj, D), b + "0.bias": (proj,), b + "2.weight": (proj, proj),
                       b + "2.bias": (proj,), b + "4.weight": (z, proj), b + "4.bias": (z,)})
    return shapes


# ---------------------------------------------------------------- embeddings (docs/reference.md §1.4, 1.5)

def test_pos_embed_test_vector():
    pe = get_2d_sincos_pos_embed(8, 4)
    assert pe.shape == (16, 8)
    tok1 = torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(pe[1], tok1, rtol=0, atol=1e-12)
    tok4 = torch.cat([tok1[4:], tok1[:4]])  # row/col swapped into the other half
    torch.testing.assert_close(pe[4], tok4, rtol=0, atol=1e-12)
    # the model's pos_embed is the float32 table, a frozen Parameter
    m = tiny(hidden_size=8, num_heads=2, input_size=8)
    assert isinstance(m.pos_embed, torch.nn.Parameter) and not m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0], pe.float())


def test_timestep_embedding_test_vector():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.5]), 8)
    expected = torch.tensor([0.87758, 0.99875, 0.99999, 1.0000, 0.47943, 0.04998, 0.00500, 0.00050])
    torch.testing.assert_close(emb[0], expected, rtol=0, atol=1e-5)
    # direct formula at the model's size 256
    t = torch.tensor([0.0, 0.3, 1.0])
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    a = t.double()[:, None] * f
    torch.testing.assert_close(TimestepEmbedder.timestep_embedding(t, 256).double(),
                               torch.cat([a.cos(), a.sin()], 1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- sizes and layout (docs/reference.md §1.1, 1.2, 1.11)

@pytest.mark.parametrize("name,total,projector", [
    ("SiT-B/2", 137_845_008, 7_344_896), ("SiT-B/4", 137_771_328, 7_344_896),
    ("SiT-L/2", 465_955_600, 7_869_184), ("SiT-XL/2", 683_242_512, 8_131_328),
    ("SiT-XL/4", 683_131_968, 8_131_328),
])
def test_parameter_counts(name, total, projector):
    with torch.device("meta"):
        m = SiT_models[name](input_size=32, z_dims=[768], encoder_depth=8)
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.projectors.parameters()) == projector


def test_xl2_official_key_layout_loads_strict():
    shapes = expected_state_dict_shapes(depth=28, D=1152, p=2, z_dims=[768])
    assert len(shapes) == 298
    with torch.device("meta"):
        m = SiT_models["SiT-XL/2"](input_size=32, z_dims=[768], encoder_depth=8, qk_norm=False)
        flat = {k: torch.empty(s) for k, s in shapes.items()}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == shapes
    m.load_state_dict(flat, strict=True)  # keys and shapes must match exactly
    flat["blocks.0.attn.qkv.weight"] = torch.empty(3456, 1153, device="meta")
    with pytest.raises(RuntimeError):
        m.load_state_dict(flat, strict=True)


def test_small_random_state_dict_roundtrip_and_qk_norm():
    shapes = expected_state_dict_shapes(depth=3, D=64, p=2, z_dims=[24, 16], T=16, num_classes=10, proj=32)
    g = torch.Generator().manual_seed(1)
    flat = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    m = tiny(z_dims=[24, 16])
    m.load_state_dict(flat, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, flat[k])
    v, zs = m.eval()(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 9]))
    assert [z.shape for z in zs] == [(2, 16, 24), (2, 16, 16)]
    q = tiny(qk_norm=True).state_dict()
    for i in range(3):
        for n in ("q_norm", "k_norm"):
            assert q[f"blocks.{i}.attn.{n}.weight"].shape == (16,) and q[f"blocks.{i}.attn.{n}.bias"].shape == (16,)
    assert len(q) == len(shapes) - 6 + 12  # one projector fewer, 4 norm tensors per block more


def test_registry_and_config():
    assert set(SiT_models) == {f"SiT-{a}/{p}" for a in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)}
    cfg = model_config("SiT-B/4", input_size=16, z_dims=[768, 1024], encoder_depth=4)
    assert cfg["decoder_hidden_size"] == cfg["hidden_size"] == 768 and cfg["patch_size"] == 4
    assert cfg["depth"] == 12 and cfg["num_heads"] == 12 and cfg["z_dims"] == [768, 1024]
    with torch.device("meta"):
        a, b = SiT(**cfg), SiT_models["SiT-B/4"](input_size=16, z_dims=[768, 1024], encoder_depth=4)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="unknown model"):
        model_config("SiT-M/2")
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        tiny(decoder_hidden_size=768)
    with pytest.raises(ValueError, match="encoder_depth"):
        tiny(encoder_depth=4)


# ---------------------------------------------------------------- forward semantics

def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    m = tiny()
    v, zs = m(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]))
    assert v.shape == (3, 4, 8, 8) and torch.count_nonzero(v) == 0
    assert zs[0].abs().sum() > 0
    plain = tiny(z_dims=[])  # no teacher: a plain SiT without projectors
    assert not any(k.startswith("projectors") for k in plain.state_dict())
    assert plain(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))[1] == []


def test_sit_s2_forward():
    torch.manual_seed(0)
    m = SiT_models["SiT-S/2"](input_size=16, encoder_depth=4, z_dims=[768]).eval()  # 128 px: 64 tokens
    assert m.final_layer.linear.in_features == 384
    with torch.no_grad():
        v, zs = m(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([7]))
    assert v.shape == (1, 4, 16, 16) and zs[0].shape == (1, 64, 768)
    assert torch.isfinite(zs[0]).all()


def test_fused_vs_explicit_attention():
    torch.manual_seed(0)
    m = randomize_(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    m.set_fused_attn(True)
    v1, z1 = m(x, t, y)
    m.set_fused_attn(False)
    v2, z2 = m(x, t, y)
    assert v1.abs().max() > 1e-3
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
    torch.testing.assert_close(z1[0], z2[0], rtol=0, atol=1e-5)


def test_projector_tap_after_encoder_depth_block():
    torch.manual_seed(0)
    m = randomize_(tiny(encoder_depth=2)).eval()
    seen = {}
    m.blocks[1].register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out[0]))
    _, zs = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    torch.testing.assert_close(zs[0], m.projectors[0](seen["h"]), rtol=1e-6, atol=1e-6)


def test_return_attn_logits_match_manual_qk():
    torch.manual_seed(0)
    m = randomize_(tiny(encoder_depth=2)).eval()
    inputs = []
    for blk in m.blocks:
        blk.attn.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v, zs, logits = m(x, t, y, return_attn=True)
    assert len(logits) == 2 and logits[0].shape == (2, 4, 16, 16)
    v_plain, zs_plain = m(x, t, y)
    torch.testing.assert_close(v, v_plain, rtol=0, atol=1e-5)
    for i in range(2):
        a = inputs[i]
        qkv = a @ m.blocks[i].attn.qkv.weight.T + m.blocks[i].attn.qkv.bias  # (B, T, 3D)
        q = qkv[..., :64].reshape(2, 16, 4, 16).transpose(1, 2)
        k = qkv[..., 64:128].reshape(2, 16, 4, 16).transpose(1, 2)
        torch.testing.assert_close(logits[i], q @ k.transpose(-1, -2) / 4.0, rtol=1e-5, atol=1e-5)


def test_unpatchify_layout():
    m = tiny()
    p, c, h = 2, 4, 4
    x = torch.randn(2, h * h, p * p * c)
    img = m.unpatchify(x)
    direct = torch.empty(2, c, h * p, h * p)
    for i in range(h):
        for j in range(h):
            for py in range(p):
                for px in range(p):
                    for ch in range(c):  # per-token layout (py, px, c), channel innermost
                        direct[:, ch, i * p + py, j * p + px] = x[:, i * h + j, (py * p + px) * c + ch]
    assert torch.equal(img, direct)


def test_label_dropout():
    m = randomize_(tiny()).train()
    y = torch.arange(10)
    null = m.y_embedder.embedding_table.weight[10]
    torch.manual_seed(3)
    drop = torch.rand(10) < 0.1
    torch.manual_seed(3)
    emb = m.y_embedder(y, train=True)
    expected = torch.where(drop[:, None], null, m.y_embedder.embedding_table.weight[y])
    assert torch.equal(emb, expected)
    assert torch.equal(m.y_embedder(y, train=False), m.y_embedder.embedding_table.weight[y])
    forced = m.y_embedder(y, train=False, force_drop_ids=(y % 2 == 0).long())
    assert torch.equal(forced[0], null) and torch.equal(forced[1], m.y_embedder.embedding_table.weight[1])


def test_grad_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    m = randomize_(tiny()).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    drop = torch.zeros(2, dtype=torch.long)
    outs = []
    for flag in (False, True):
        m.grad_checkpointing = flag
        m.zero_grad()
        v, zs = m(x, t, y, force_drop_ids=drop)
        (v.square().sum() + zs[0].sum()).backward()
        outs.append((v.detach(), m.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_resample_tokens():
    z = torch.randn(2, 256, 5)
    small = resample_tokens(z, (8, 8))
    grid = z.reshape(2, 16, 16, 5)
    pooled = (grid[:, 0::2, 0::2] + grid[:, 1::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 1::2]) / 4
    torch.testing.assert_close(small, pooled.reshape(2, 64, 5), rtol=0, atol=1e-6)
    assert resample_tokens(z, 16) is z
    big = resample_tokens(torch.ones(1, 16, 3), 8)
    assert big.shape == (1, 64, 3) and torch.allclose(big, torch.ones(1, 64, 3))
    with pytest.raises(ValueError, match="square"):
        resample_tokens(torch.randn(1, 15, 3), 4)


def direct_sit_forward(sd, x, t, y, *, p, heads, encoder_depth, depth, C=4):
    """docs/reference.md §1.3-1.9 written out from the state dict alone (eval mode, explicit softmax)."""
    import torch.nn.functional as F

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    B = x.shape[0]
    D = sd["pos_embed"].shape[-1]
    g = x.shape[-1] // p
    # patches flattened in (c, py, px) order = the conv weight's layout
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    h = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    temb = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], -1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    hd = D // heads
    zs = None
    for i in range(depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1")[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = [mod[..., k * D:(k + 1) * D] for k in range(6)]
        a = ln(h) * (1 + sc1) + sh1
        qkv = lin(a, b + "attn.qkv").reshape(B, -1, 3, heads, hd)
        q, k, v = [qkv[:, :, j].transpose(1, 2) for j in range(3)]
        att = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, -1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        a = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        if i == encoder_depth - 1:
            zs = lin(F.silu(lin(F.silu(lin(h, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    mod = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None]
    out = lin(ln(h) * (1 + mod[..., D:]) + mod[..., :D], "final_layer.linear")  # shift first, then scale
    img = out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)
    return img, zs


@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_direct_reference_implementation(fused):
    torch.manual_seed(0)
    m = randomize_(tiny(fused_attn=fused), std=0.1).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])  # 10 = null class
    v, zs = m(x, t, y)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    v_ref, z_ref = direct_sit_forward(sd, x, t, y, p=2, heads=4, encoder_depth=2, depth=3)
    assert v.abs().max() > 1e-2
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs[0], z_ref, rtol=1e-5, atol=1e-5)
