"""preprocess.teachers: reference preprocessing, pos-embed resampling, features, HASTE partial forward.

Tiny DINOv2-architecture timm models (random weights, 7x7 native grid like DINOv2's 37x37) are saved with
timm's save_for_hf and loaded through the user path `timm:local-dir:PATH`; every output is compared with a
hand-written forward that follows docs/reference.md sections 4 and 7.1 directly.
"""
import time

import pytest
import torch
import torch.nn.functional as F

from repa.preprocess.hub import ModelDownloadError
from repa.preprocess.teachers import IMAGENET_MEAN, IMAGENET_STD, load_teacher, load_teachers

NATIVE = 98          # 7x7 patches of 14 px: the teacher is stored at a grid that must be resampled
R = 64               # dataset resolution -> input 14 * 64/16 = 56, grid 4x4


def _save_tiny(path, arch, **extra):
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(0)
    args = dict(img_size=NATIVE, depth=4, embed_dim=64, num_heads=2, **extra)
    model = timm.create_model(arch, pretrained=False, **args)
    with torch.no_grad():               # non-trivial LayerScale / pos-embed so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("gamma") or "pos_embed" in name or "token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    save_for_hf(model, str(path), model_args=args, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2_tiny")
    return d, _save_tiny(d, "vit_small_patch14_dinov2")


@pytest.fixture(scope="module")
def tiny_reg(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2_reg_tiny")
    return d, _save_tiny(d, "vit_small_patch14_reg4_dinov2")


def _images(n=2, r=R, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, r, r), generator=g, dtype=torch.uint8)


def _ref_preprocess(images, size):
    """docs/reference.md §4: x/255 -> torchvision Normalize(ImageNet) -> F.interpolate(bicubic), float32."""
    from torchvision.transforms import Normalize
    x = images.float() / 255.0
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    return F.interpolate(x, size, mode="bicubic")


def _ref_resample(pos, old, new, prefix):
    """The reference pos-embed resample written out: keep prefix rows, bicubic antialias on the grid."""
    head, grid = pos[:, :prefix], pos[:, prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(1, new * new, d)], dim=1)


def _hand_vit(m, x, prefix_pos):
    """Explicit ViT forward (DINOv2 layout). Returns residual entering each block, logits, final tokens."""
    w = m.patch_embed.proj
    h = F.conv2d(x, w.weight, w.bias, stride=14).flatten(2).transpose(1, 2)
    B = h.shape[0]
    pre = [m.cls_token.expand(B, -1, -1)]
    if m.reg_token is not None:
        pre.append(m.reg_token.expand(B, -1, -1))
    if prefix_pos:                                   # pos-embed covers CLS + patches (classic DINOv2)
        h = torch.cat(pre + [h], 1) + m.pos_embed
    else:                                            # registers variant: pos on patches only
        h = torch.cat(pre + [h + m.pos_embed], 1)
    residuals, logits = [], []
    for blk in m.blocks:
        residuals.append(h)
        a = blk.attn
        y = F.layer_norm(h, (h.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, h.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        lg = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        logits.append(lg)
        o = (lg.softmax(-1) @ v).transpose(1, 2).reshape(B, h.shape[1], -1)
        h = h + blk.ls1.gamma * (o @ a.proj.weight.T + a.proj.bias)
        y = F.layer_norm(h, (h.shape[-1],), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        h = h + blk.ls2.gamma * y
    residuals.append(h)
    out = F.layer_norm(h, (h.shape[-1],), m.norm.weight, m.norm.bias, 1e-6)
    return residuals, logits, out


def test_preprocess_equals_reference_formula(tiny):
    d, _ = tiny
    t = load_teacher(f"timm:local-dir:{d}", R)
    img = _images()
    assert t.input_size == (56, 56)
    assert torch.equal(t.preprocess(img), _ref_preprocess(img, 56))
    t256 = load_teacher(f"timm:local-dir:{d}", 256)
    img = _images(1, 256)
    assert torch.equal(t256.preprocess(img), _ref_preprocess(img, 224))     # 224 * (256 // 256)
    p = t256.provenance
    assert p["input_size"] == 224 and p["tokens"] == 256 and p["grid"] == [16, 16] and p["dim"] == 64
    assert p["preprocess"] == "x/255, imagenet-normalize, bicubic(antialias=False) to 224"


@pytest.mark.parametrize("which", ["tiny", "tiny_reg"])
def test_pos_embed_resampled_like_reference(which, request):
    d, orig = request.getfixturevalue(which)
    t = load_teacher(f"timm:local-dir:{d}", R)
    prefix = 0 if orig.no_embed_class else 1
    with torch.no_grad():
        want = _ref_resample(orig.pos_embed, 7, 4, prefix)
    assert t.model.pos_embed.shape == want.shape
    torch.testing.assert_close(t.model.pos_embed.data, want, rtol=0, atol=1e-6)
    if prefix:
        assert torch.equal(t.model.pos_embed[:, :1], orig.pos_embed[:, :1])    # CLS position kept


@pytest.mark.parametrize("which", ["tiny", "tiny_reg"])
def test_features_and_haste_equal_hand_forward(which, request):
    d, orig = request.getfixturevalue(which)
    t = load_teacher(f"timm:local-dir:{d}", R)
    P = 1 + (4 if orig.reg_token is not None else 0)
    assert t.num_prefix_tokens == P and t.num_tokens == 16 and t.embed_dim == 64
    img = _images()
    with torch.no_grad():
        res, logits, out = _hand_vit(t.model, _ref_preprocess(img, 56), prefix_pos=not orig.no_embed_class)
    feats = t(img)
    assert feats.shape == (2, 16, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, out[:, P:], rtol=1e-5, atol=1e-5)           # norm tokens, prefix dropped
    # timm's own forward_features on the same input agrees too
    torch.testing.assert_close(feats, t.model.forward_features(t.preprocess(img))[:, P:], rtol=0, atol=1e-6)
    # HASTE: residual entering block 2, then blocks 2..3 with attention logits
    r2 = t.residual_before(img, 2)
    assert r2.shape == (2, P + 16, 64)
    torch.testing.assert_close(r2, res[2], rtol=1e-5, atol=1e-5)
    f2, lg = t.forward_from(r2, 2, attn_blocks=(2, 3))
    torch.testing.assert_close(f2, feats, rtol=0, atol=1e-6)                      # equals the full forward
    assert len(lg) == 2 and lg[0].shape == (2, 2, 16, 16)
    for got, b in zip(lg, (2, 3)):
        torch.testing.assert_close(got, logits[b][:, :, P:, P:], rtol=1e-5, atol=1e-6)
    f0, lg0 = t.forward_from(t.residual_before(img, 0), 0, attn_blocks=(0,))
    torch.testing.assert_close(f0, feats, rtol=0, atol=1e-6)
    torch.testing.assert_close(lg0[0], logits[0][:, :, P:, P:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention blocks"):
        t.forward_from(r2, 2, attn_blocks=(1,))


def test_clip_recipe_resize_first_and_prenorm(tiny):
    """CLIP order (resize, then CLIP normalize) and pre-final-norm tokens, on the same tiny ViT."""
    from repa.preprocess.teachers import CLIP_MEAN, CLIP_STD, Teacher, _Recipe
    import timm
    d, _ = tiny
    model = timm.create_model(f"local-dir:{d}", pretrained=True, num_classes=0)
    recipe = _Recipe(CLIP_MEAN, CLIP_STD, "clip", resize_first=True, final_norm=False)
    t = Teacher(model, name="clip-like", model_id=None, resolution=R, recipe=recipe)
    img = _images(1)
    x = F.interpolate(img.float() / 255, 56, mode="bicubic")
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(t.preprocess(img), x, rtol=0, atol=1e-6)
    with torch.no_grad():
        res, _, _ = _hand_vit(t.model, x, prefix_pos=True)
    torch.testing.assert_close(t(img), res[-1][:, 1:], rtol=1e-5, atol=1e-5)   # no final norm
    assert t.provenance["preprocess"] == "x/255, bicubic(antialias=False) to 56, clip-normalize, pre-final-norm tokens"


def test_list_channels_last_and_errors(tiny, tmp_path, monkeypatch):
    d, _ = tiny
    ts = load_teachers(f"timm:local-dir:{d}, timm:local-dir:{d}", R)
    assert len(ts) == 2 and ts[1].provenance["id"] == f"local-dir:{d}"
    img = _images(1)
    cl = load_teacher(f"timm:local-dir:{d}", R, channels_last=True)
    torch.testing.assert_close(cl(img), ts[0](img), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--enc-type"):
        load_teacher("dinov3-vit-q", R)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_teacher(f"timm:local-dir:{d}", 40)
    with pytest.raises(FileNotFoundError, match="save_for_hf"):
        load_teacher(f"timm:local-dir:{tmp_path}", R)
    with pytest.raises(ValueError, match="loaded for 64px"):
        ts[0](_images(1, 32))
    monkeypatch.chdir(tmp_path)                                  # no ./ckpts here
    with pytest.raises(ModelDownloadError, match=r"ckpts/mocov3_vitb\.pth"):
        load_teacher("mocov3-vit-b", 256)


def test_offline_uncached_dinov2_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    assert c.HF_HUB_OFFLINE, "conftest must set HF_HUB_OFFLINE=1 before huggingface_hub is imported"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))             # empty torch.hub cache
    t0 = time.perf_counter()
    with pytest.raises(ModelDownloadError) as ei:
        load_teacher("dinov2-vit-s", 256)
    assert time.perf_counter() - t0 < 10
    msg = str(ei.value)
    for needle in ("dinov2-vit-s", "vit_small_patch14_dinov2", "facebookresearch/dinov2",
                   "huggingface-cli login", "HF_HUB_OFFLINE=1", "timm:local-dir:"):
        assert needle in msg, (needle, msg)


def test_unreachable_hub_fails_in_seconds(tmp_path):
    """Network on but the hub dead (closed loopback port): no minutes of retries, a clear message.

    A subprocess because huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once, at import time.
    """
    import os
    import subprocess
    import sys
    code = (
        "import time\n"
        "from preprocess.hub import ModelDownloadError\n"
        "from preprocess.teachers import load_teacher\n"
        "import timm\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    load_teacher('timm:vit_small_patch14_dinov2.lvd142m', 64)\n"
        "except ModelDownloadError as e:\n"
        "    print('ERR', round(time.perf_counter() - t0, 2), str(e).replace(chr(10), ' '))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(v, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert float(lines[0].split()[1]) < 5, lines[0]           # hub retries would take ~25 s per file
    for needle in ("vit_small_patch14_dinov2.lvd142m", "unreachable", "127.0.0.1:9", "huggingface-cli login",
                   "timm:local-dir:"):
        assert needle in lines[0], (needle, lines[0])


_FAKE_HUBCONF = '''
import os
import torch
from safetensors.torch import load_file

class _HubDinoV2(torch.nn.Module):
    """Stand-in for the torch.hub DinoVisionTransformer: only its state dict matters to repa."""
    def __init__(self, sd):
        super().__init__()
        self._sd = sd
    def state_dict(self, *args, **kwargs):
        return dict(self._sd)

def dinov2_vits14_reg(pretrained=True):
    return _HubDinoV2(load_file(os.path.join(os.path.dirname(__file__), "weights.safetensors")))
'''


def test_dinov2_torch_hub_path_converts_like_reference(tmp_path, monkeypatch):
    """timm unavailable offline -> cached torch.hub DINOv2 (registers variant), converted to timm."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model("vit_small_patch14_reg4_dinov2").state_dict().items()}
    hub = {k: torch.randn(s) * 0.1 for k, s in shapes.items() if k not in ("reg_token", "pos_embed")}
    hub["register_tokens"] = torch.randn(1, 4, 384)
    hub["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384)            # hub layout: CLS position + 37x37
    hub["mask_token"] = torch.zeros(1, 384)
    for k in list(hub):
        if k.endswith("ls1.gamma") or k.endswith("ls2.gamma"):
            hub[k] = torch.full_like(hub[k], 1e-5)
    home = tmp_path / "torch"
    repo = home / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(_FAKE_HUBCONF)
    save_file(hub, str(repo / "weights.safetensors"))
    (home / "hub" / "checkpoints").mkdir()
    (home / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth").write_bytes(b"")
    monkeypatch.setenv("TORCH_HOME", str(home))
    t = load_teacher("dinov2-vit-s-reg", 256)
    assert t.provenance["id"] == "facebookresearch/dinov2:dinov2_vits14_reg"
    assert t.num_prefix_tokens == 5 and t.num_tokens == 256 and t.input_size == (224, 224)
    img = _images(1, 256)
    x = _ref_preprocess(img, 224)
    pos = _ref_resample(hub["pos_embed"], 37, 16, prefix=1)          # REPA's resample, CLS position kept
    patches = F.conv2d(x, hub["patch_embed.proj.weight"], hub["patch_embed.proj.bias"], stride=14)
    patches = patches.flatten(2).transpose(1, 2)
    want = torch.cat([hub["cls_token"] + pos[:, :1], hub["register_tokens"], patches + pos[:, 1:]], dim=1)
    torch.testing.assert_close(t.residual_before(img, 0), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(t.model.blocks[3].attn.qkv.weight, hub["blocks.3.attn.qkv.weight"])


def test_mocov3_local_checkpoint(tmp_path, monkeypatch):
    """./ckpts/mocov3_vits.pth (MoCo v3 layout: module.base_encoder. prefix, 14x14 grid) -> 16x16 tokens."""
    import timm
    with torch.device("meta"):
        ref = timm.models.VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                            num_classes=0)
    torch.manual_seed(0)
    sd = {f"module.base_encoder.{k}": torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    for k in ("pos_embed", "blocks.11.mlp.fc2.weight"):                 # the values checked below
        sd[f"module.base_encoder.{k}"] = torch.randn(ref.state_dict()[k].shape)
    sd["module.base_encoder.head.weight"] = torch.zeros(10, 384)          # dropped
    sd["module.predictor.0.weight"] = torch.zeros(4, 4)                    # dropped
    (tmp_path / "ckpts").mkdir()
    torch.save({"state_dict": sd, "epoch": 300, "arch": "vit_small"}, tmp_path / "ckpts" / "mocov3_vits.pth")
    monkeypatch.chdir(tmp_path)
    t = load_teacher("mocov3-vit-s", 256)
    assert t.input_size == (256, 256) and t.num_tokens == 256 and t.embed_dim == 384
    assert t.provenance["preprocess"] == "x/255, imagenet-normalize"                     # no resize at 256
    want = _ref_resample(sd["module.base_encoder.pos_embed"], 14, 16, prefix=1)
    torch.testing.assert_close(t.model.pos_embed.data, want, rtol=0, atol=1e-6)
    assert torch.equal(t.model.blocks[11].mlp.fc2.weight, sd["module.base_encoder.blocks.11.mlp.fc2.weight"])
    assert t.model.cls_token.data_ptr() != 0 and not any(p.is_meta for p in t.model.parameters())
