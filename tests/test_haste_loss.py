"""HASTE attention alignment (docs/reference.md §7.3) against a direct implementation of the reference formula."""
import pytest
import torch

from repa.trainer.haste import HasteConfig, attention_alignment_loss, default_haste_config
from repa.trainer.models import build_model


def reference_attn_loss(student_list, teacher_list):
    """docs/reference.md §7.3 verbatim: blocks 4+j vs 8+j, first 12 heads, rows flattened, log(softmax)."""
    total = 0.0
    for j in range(4):
        s = student_list[4 + j][:, :12].reshape(-1, student_list[4 + j].shape[-1])
        t = teacher_list[8 + j].reshape(-1, teacher_list[8 + j].shape[-1])
        p = torch.softmax(t.double(), dim=-1)
        q = torch.softmax(s.double(), dim=-1)
        total += (-(p * torch.log(q)).sum(dim=-1)).mean()
    return total / 4


def test_published_setting_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    B, T = 2, 16
    student = [torch.randn(B, 16, T, T, generator=g) * 3 for _ in range(8)]  # 16 heads, encoder_depth 8
    teacher = [torch.randn(B, 12, T, T, generator=g) * 3 for _ in range(12)]  # full 12-block teacher
    ref = reference_attn_loss(student, teacher)
    got = attention_alignment_loss(student, teacher, (4, 5, 6, 7), teacher_index_map=(8, 9, 10, 11), num_heads=12)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - ref.item()) < 1e-5
    # the partial teacher returns only blocks 8..11: default map = position in the list
    got2 = attention_alignment_loss(student, teacher[8:], (4, 5, 6, 7))
    assert got2.item() == got.item()
    # fp16 teacher logits (as the reference's autocast produces) are upcast, not a problem
    got3 = attention_alignment_loss(student, [x.half() for x in teacher[8:]])
    assert abs(got3.item() - ref.item()) < 1e-2


def test_log_softmax_equals_log_of_softmax_on_normal_inputs():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 12, 256, 256, generator=g) * 4, torch.randn(2, 12, 256, 256, generator=g) * 4
    log_q = torch.log(torch.softmax(s, -1))  # the reference, in float32
    # elementwise: a few float32 ulps of values up to ~|40|
    assert (torch.log_softmax(s, -1) - log_q).abs().max() < 2e-5
    ref_fp32 = (-(torch.softmax(t, -1) * log_q).sum(-1)).mean()
    ours = attention_alignment_loss([s], [t], student_blocks=(0,), num_heads=12)
    assert abs(ours.item() - ref_fp32.item()) < 1e-6 * ref_fp32.item()
    # where the reference's log(softmax) breaks down, ours stays finite
    big = torch.zeros(1, 1, 2, 2)
    big[..., 0] = 200.0
    assert torch.isinf(torch.log(torch.softmax(big, -1))).any()
    loss = attention_alignment_loss([big], [torch.zeros(1, 1, 2, 2)], student_blocks=(0,), num_heads=1)
    assert torch.isfinite(loss) and abs(loss.item() - 100.0) < 1e-4  # CE = 0.5·200 + log(1 + e^-200)


def test_identical_logits_give_teacher_entropy():
    torch.manual_seed(0)
    m = build_model("SiT-S/2", input_size=8, num_classes=10, depth=3, hidden_size=64, num_heads=4,
                    encoder_depth=2, projector_dim=16, z_dims=[8]).eval()
    _, _, logits = m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), return_attn=True)
    teacher = [lg.detach().clone() for lg in logits]
    loss = attention_alignment_loss(logits, teacher, student_blocks=(0, 1), num_heads=4)
    entropy = sum((-(lg.softmax(-1) * lg.log_softmax(-1)).sum(-1)).mean() for lg in teacher) / 2
    torch.testing.assert_close(loss, entropy, rtol=1e-6, atol=1e-6)
    loss.backward()  # gradient reaches the student's qkv through the logits
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_config_defaults_and_mapping():
    cfg = HasteConfig()
    assert (cfg.student_blocks, cfg.teacher_blocks, cfg.heads, cfg.attn_coeff, cfg.early_stop_point) == \
        ((4, 5, 6, 7), (8, 9, 10, 11), 12, 0.5, 250_000)
    assert cfg.active(249_999) and not cfg.active(250_000)
    assert cfg.min_encoder_depth == 8 and cfg.first_teacher_block == 8
    assert default_haste_config(encoder_depth=8, student_heads=16) == cfg  # SiT-XL/2, SiT-L/2
    b = default_haste_config(encoder_depth=4, student_heads=12)  # SiT-B/2
    assert b.student_blocks == (0, 1, 2, 3) and b.teacher_blocks == (8, 9, 10, 11) and b.heads == 12
    s = default_haste_config(encoder_depth=2, student_heads=6, early_stop_point=10)
    assert s.student_blocks == (0, 1) and s.teacher_blocks == (10, 11) and s.heads == 6 and s.early_stop_point == 10
    cfg.validate(student_depth=28, student_heads=16, encoder_depth=8, teacher_depth=12, teacher_heads=12)
    with pytest.raises(ValueError, match="encoder_depth"):
        cfg.validate(student_depth=12, student_heads=12, encoder_depth=4, teacher_depth=12, teacher_heads=12)
    with pytest.raises(ValueError, match="heads"):
        cfg.validate(student_depth=12, student_heads=6, encoder_depth=8, teacher_depth=12, teacher_heads=12)
    with pytest.raises(ValueError):
        HasteConfig(student_blocks=(1, 2), teacher_blocks=(3,))


def test_shape_errors():
    s = [torch.randn(1, 4, 16, 16)]
    with pytest.raises(ValueError, match="heads"):
        attention_alignment_loss(s, [torch.randn(1, 12, 16, 16)], student_blocks=(0,), num_heads=12)
    with pytest.raises(ValueError, match="token"):
        attention_alignment_loss(s, [torch.randn(1, 4, 64, 64)], student_blocks=(0,), num_heads=4)
    with pytest.raises(ValueError, match="encoder_depth"):
        attention_alignment_loss(s, [torch.randn(1, 4, 16, 16)] * 2, student_blocks=(0, 1), num_heads=4)
