"""preprocess.vae: moments equal diffusers' posterior (docs/reference.md §5.2/5.3), scaling convention, fail-fast."""
import math
import time

import pytest
import torch

from repa.preprocess.hub import ModelDownloadError
from repa.preprocess.vae import load_vae


def _tiny_vae(**cfg):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, **cfg).eval()


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = _tiny_vae()
    vae.save_pretrained(d)
    return d, vae


def _images(n=2, r=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, r, r), generator=g, dtype=torch.uint8)
    return u8.float() / 127.5 - 1                       # docs/reference.md §5.2 step 1


def test_moments_equal_diffusers_posterior_and_formula(tiny_vae_dir):
    d, ref = tiny_vae_dir
    vae = load_vae(str(d))
    x = _images()
    m = vae.encode_moments(x)
    assert m.dtype == torch.float32 and m.shape == (2, 8, 16, 16)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        assert torch.equal(m[:, :4], dist.mean) and torch.equal(m[:, 4:], dist.std)
        # the formula itself: moments = quant_conv(encoder(x)) -> mean, clamp(logvar) -> exp(0.5 logvar)
        h = ref.quant_conv(ref.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        torch.testing.assert_close(m[:, :4], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(m[:, 4:], torch.exp(0.5 * logvar.clamp(-30, 20)), rtol=1e-6, atol=1e-7)
    assert vae.provenance == {"id": str(d.resolve()), "latent_channels": 4, "downsample": 2,
                              "scale": [0.18215] * 4, "bias": [0.0] * 4}


def test_logvar_clamped_to_20(tmp_path):
    vae = _tiny_vae()
    with torch.no_grad():                              # push logvar far above 20 -> std = exp(10) exactly
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(50.0)
    vae.save_pretrained(tmp_path)
    m = load_vae(str(tmp_path)).encode_moments(_images(1))
    assert torch.all(m[:, 4:] == torch.tensor(math.exp(10.0), dtype=torch.float32))


def test_decode_unscaled_latent(tiny_vae_dir):
    d, ref = tiny_vae_dir
    vae = load_vae(str(d))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = vae.decode(z)
    with torch.no_grad():
        assert torch.equal(out, ref.decode(z).sample)
    assert out.shape == (1, 3, 32, 32)


def test_scaling_convention_from_config(tmp_path):
    _tiny_vae(scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp_path / "vae")   # pipeline layout
    prov = load_vae(str(tmp_path)).provenance
    assert prov["scale"] == [0.5] * 4
    assert prov["bias"] == pytest.approx([-0.05] * 4)          # z*scale + bias == (z - shift) * scale


def test_pixel_space():
    vae = load_vae("none")
    x = _images(2, 16)
    m = vae.encode_moments(x)
    assert torch.equal(m[:, :3], x) and torch.equal(m[:, 3:], torch.zeros_like(x))
    assert torch.equal(vae.decode(x), x)
    assert vae.provenance == {"id": None, "latent_channels": 3, "downsample": 1,
                              "scale": [1.0] * 3, "bias": [0.0] * 3}


def test_bad_inputs_name_the_flag(tmp_path, tiny_vae_dir):
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_vae(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))                                 # exists, empty
    with pytest.raises(ValueError, match="--vae"):
        load_vae("not-a-repo-id")
    vae = load_vae(str(tiny_vae_dir[0]))
    with pytest.raises(ValueError, match="multiple"):
        vae.encode_moments(torch.zeros(1, 3, 33, 33))


@pytest.mark.parametrize("spec,repo", [("ema", "stabilityai/sd-vae-ft-ema"),
                                       ("someone/not-cached-vae", "someone/not-cached-vae")])
def test_offline_uncached_fails_fast_with_fixes(spec, repo):
    import huggingface_hub.constants as c
    assert c.HF_HUB_OFFLINE, "conftest must set HF_HUB_OFFLINE=1 before huggingface_hub is imported"
    t0 = time.perf_counter()
    with pytest.raises(ModelDownloadError) as ei:
        load_vae(spec)
    assert time.perf_counter() - t0 < 10
    msg = str(ei.value)
    for needle in (repo, "huggingface-cli login", "HF_HUB_OFFLINE=1", "--vae /path"):
        assert needle in msg, (needle, msg)
