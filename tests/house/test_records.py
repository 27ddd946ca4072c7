"""repa.shards.records: the one place that names REPA record fields and holds the latent convention."""
import torch

from repa.shards import records as R


def test_field_names_round_trip_and_order():
    assert R.feat(0) == "feat.0" and R.feat_flip(2) == "feat_flip.2" and R.haste(0) == "haste.0"
    assert R.text(4) == "text.4"
    assert R.parse("feat.12") == ("feat", 12) and R.parse("moments") == ("moments", None)
    assert R.parse("feat.x") == ("feat.x", None)
    fields = ["moments", "feat.10", "label", "feat.2", "feat_flip.0", "haste.0", "text.1", "text.0"]
    assert R.teacher_fields(fields) == ["feat.2", "feat.10"]
    assert R.text_fields(fields) == ["text.0", "text.1"]


def test_latent_convention_inverts_and_matches_the_official_scaling():
    scale, bias = R.latent_convention({"scale": [0.18215] * 4, "bias": [0.0] * 4}, 4)
    z = torch.randn(2, 4, 3, 3)
    assert torch.equal(R.scale_latents(z, scale, bias), z * torch.tensor(0.18215))
    back = R.unscale_latents(R.scale_latents(z, [0.5, 2, 1, 3], [1, -1, 0, 2]), [0.5, 2, 1, 3], [1, -1, 0, 2])
    torch.testing.assert_close(back, z, rtol=0, atol=1e-6)
    assert R.latent_convention(None, 3) == ([1.0] * 3, [0.0] * 3)


def test_sample_latents_is_the_posterior_draw():
    mean, std = torch.randn(2, 4, 2, 2), torch.rand(2, 4, 2, 2)
    torch.manual_seed(0)
    got = R.sample_latents(torch.cat([mean, std], 1), [0.18215] * 4, [0.0] * 4)
    torch.manual_seed(0)
    eps = torch.randn_like(mean)
    torch.testing.assert_close(got, (mean + std * eps) * 0.18215, rtol=0, atol=0)
