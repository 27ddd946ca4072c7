"""HASTE attention alignment (docs/reference.md section 7): loss, layer/head mapping, phase switch.

During phase I (``step < early_stop_point``) HASTE adds to REPA's objective
    attn_coeff · mean_j CE( softmax(teacher logits of block tb_j) -> softmax(student logits of block sb_j) )
where the cross-entropy is taken row-wise over the T key tokens, averaged over rows (batch x heads x
queries) and then over the block pairs j. The published setting (docs/reference.md §7.3): SiT-XL/2 blocks 4-7
(0-indexed), their first 12 of 16 heads, against DINOv2-B blocks 8-11 with the CLS row and column removed
before the softmax (that slicing is the teacher side's job, ``preprocess/teachers.py``).

Numerics: the reference computes ``log(softmax(student))``; we use ``log_softmax``, which is the same
function but cannot produce log(0) = -inf when a probability underflows. Both logit sets are upcast to
float32 first (the reference's teacher softmax runs on fp16 logits). On ordinary logits the two agree to
~1e-7 (tests/test_haste_loss.py).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from repa.preprocess.teachers import load_teacher
from repa.shards import records as R

__all__ = ["HasteConfig", "default_haste_config", "attention_alignment_loss", "HasteOnline", "setup_haste"]


@dataclass(frozen=True)
class HasteConfig:
    """Which student blocks/heads align to which teacher blocks, and the phase-I schedule.

    student_blocks: 0-indexed SiT blocks (each must be < the model's encoder_depth, since the model only
        returns attention logits for blocks 0..encoder_depth-1).
    teacher_blocks: 0-indexed teacher blocks, paired position-wise with student_blocks.
    heads: the first ``heads`` heads of each student block pair with the first ``heads`` teacher heads.
    attn_coeff: weight of the attention term. early_stop_point: first step without any alignment.
    Defaults are the published SiT-XL/2 + DINOv2-B recipe.
    """
    student_blocks: tuple[int, ...] = (4, 5, 6, 7)
    teacher_blocks: tuple[int, ...] = (8, 9, 10, 11)
    heads: int = 12
    attn_coeff: float = 0.5
    early_stop_point: int = 250_000

    def __post_init__(self):
        object.__setattr__(self, "student_blocks", tuple(int(b) for b in self.student_blocks))
        object.__setattr__(self, "teacher_blocks", tuple(int(b) for b in self.teacher_blocks))
        if len(self.student_blocks) != len(self.teacher_blocks) or not self.student_blocks:
            raise ValueError(f"HASTE needs as many student blocks {self.student_blocks} as teacher blocks "
                             f"{self.teacher_blocks} (at least one)")
        if min(self.student_blocks + self.teacher_blocks) < 0 or self.heads < 1:
            raise ValueError("HASTE block indices must be >= 0 and heads >= 1")

    @property
    def min_encoder_depth(self) -> int:
        """Smallest SiT encoder_depth that exposes logits for all student blocks."""
        return max(self.student_blocks) + 1

    @property
    def first_teacher_block(self) -> int:
        """Teacher block from which the (partial) teacher forward must run."""
        return min(self.teacher_blocks)

    def active(self, step: int) -> bool:
        """True while alignment (attention and projection) is on: steps 0..early_stop_point-1."""
        return step < self.early_stop_point

    def validate(self, student_depth: int, student_heads: int, encoder_depth: int,
                 teacher_depth: int, teacher_heads: int) -> None:
        """Raise a clear error if this mapping does not fit the given student/teacher."""
        if encoder_depth < self.min_encoder_depth or encoder_depth > student_depth:
            raise ValueError(f"HASTE student blocks {self.student_blocks} need encoder_depth >= "
                             f"{self.min_encoder_depth} (got {encoder_depth}, model depth {student_depth})")
        if max(self.teacher_blocks) >= teacher_depth:
            raise ValueError(f"HASTE teacher blocks {self.teacher_blocks} exceed the teacher's {teacher_depth} blocks")
        if self.heads > min(student_heads, teacher_heads):
            raise ValueError(f"HASTE heads={self.heads} but the student has {student_heads} and the teacher "
                             f"{teacher_heads} heads")


def default_haste_config(encoder_depth: int, student_heads: int, teacher_depth: int = 12,
                         teacher_heads: int = 12, num_pairs: int = 4, **overrides) -> HasteConfig:
    """A sensible mapping for any student/teacher (a heuristic, except for the published case).

    Generalises the published choice (SiT-XL/2 encoder_depth 8: student blocks 4-7 <-> DINOv2-B 8-11):
      * student blocks: the ``num_pairs`` blocks ending at the REPA tap, encoder_depth-n .. encoder_depth-1;
      * teacher blocks: the teacher's last n blocks, teacher_depth-n .. teacher_depth-1;
      * heads: min(student_heads, teacher_heads), the first heads of each side paired in order;
    with n = min(num_pairs, encoder_depth, teacher_depth). For SiT-XL/2 or SiT-L/2 (encoder_depth 8, 16 heads)
    and DINOv2-B this is exactly the published setting; for SiT-B/2 with encoder_depth 4 it pairs blocks
    0-3 with 8-11 on all 12 heads; for SiT-S (6 heads) the first 6 heads of each side.
    """
    n = min(num_pairs, encoder_depth, teacher_depth)
    cfg = dict(student_blocks=tuple(range(encoder_depth - n, encoder_depth)),
               teacher_blocks=tuple(range(teacher_depth - n, teacher_depth)),
               heads=min(student_heads, teacher_heads))
    cfg.update(overrides)
    return HasteConfig(**cfg)


def attention_alignment_loss(student_logits_list: Sequence[torch.Tensor], teacher_logits_list: Sequence[torch.Tensor],
                             student_blocks: Sequence[int] = (4, 5, 6, 7),
                             teacher_index_map: Sequence[int] | None = None,
                             num_heads: int = 12) -> torch.Tensor:
    """HASTE attention-alignment loss (docs/reference.md §7.3), a float32 scalar.

    student_logits_list: the SiT's pre-softmax logits indexed by block (``model(..., return_attn=True)[2]``),
        each (B, H_s, T, T).
    teacher_logits_list: teacher pre-softmax logits over patch tokens only (CLS removed), each (B, H_t, T, T).
    student_blocks: which student blocks to align.
    teacher_index_map: for each student block, the position of its partner in ``teacher_logits_list``.
        None means the teacher list holds exactly the aligned blocks, in order (as the partial teacher
        forward returns them); pass (8, 9, 10, 11) for a full 12-block list like the reference's.
    num_heads: the first ``num_heads`` heads of both sides are paired in order.

    loss = (1/J) Σ_j mean_rows( -Σ_k softmax(teacher)_k · log_softmax(student)_k ).
    """
    student_blocks = list(student_blocks)
    if teacher_index_map is None:
        teacher_index_map = range(len(student_blocks))
    teacher_index_map = list(teacher_index_map)
    if len(teacher_index_map) != len(student_blocks) or not student_blocks:
        raise ValueError(f"{len(student_blocks)} student blocks but {len(teacher_index_map)} teacher indices")
    total = 0.0
    for sb, ti in zip(student_blocks, teacher_index_map):
        if sb >= len(student_logits_list):
            raise ValueError(f"student block {sb} has no attention logits: the model returned "
                             f"{len(student_logits_list)} (raise encoder_depth)")
        s, t = student_logits_list[sb], teacher_logits_list[ti]
        if s.shape[1] < num_heads or t.shape[1] < num_heads:
            raise ValueError(f"need {num_heads} heads, student block {sb} has {s.shape[1]}, teacher has {t.shape[1]}")
        s, t = s[:, :num_heads].float(), t[:, :num_heads].float()
        if s.shape != t.shape:
            raise ValueError(f"student block {sb} logits {tuple(s.shape)} vs teacher {tuple(t.shape)}: the token "
                             "grids must match (same number of student and teacher patch tokens)")
        p_teacher = F.softmax(t, dim=-1)
        log_q = F.log_softmax(s, dim=-1)
        total = total + (-(p_teacher * log_q).sum(dim=-1)).mean()
    return total / len(student_blocks)


# ---------------------------------------------------------------- the training loop's view of HASTE

@dataclass
class HasteOnline:
    """HASTE in a training run, behind a narrow interface: which fields to read and whether the teacher runs at a
    step, the teacher's online outputs, and the attention loss. Phase I (steps < early_stop_point) runs the
    teacher's remaining blocks online on the cached residual ``field``; phase II needs no teacher at all."""
    config: HasteConfig
    field: str  # e.g. "haste.0": residual entering teacher block ``start_block``
    teacher_index: int  # which feat.<i> the online features replace
    start_block: int
    load_teacher: Callable[[], torch.nn.Module]
    autocast: Callable = nullcontext  # the teacher runs under the run's mixed precision, like the reference's
    teacher: torch.nn.Module | None = None

    def needs_teacher(self, step: int) -> bool:
        return self.config.active(step)

    def at(self, step: int) -> "HasteOnline | None":
        """Self, with the teacher loaded, while phase I runs at ``step``; None in phase II (teacher freed)."""
        if not self.needs_teacher(step):
            self.teacher = None
            return None
        if self.teacher is None:
            self.teacher = self.load_teacher()
        return self

    def fields(self, step: int, feats: list[str]) -> list[str]:
        """Fields to read at ``step``: phase I swaps the cached feat.<teacher_index> for the residual."""
        if not self.needs_teacher(step):
            return [R.MOMENTS]
        return [R.MOMENTS, *[f for f in feats if f != R.feat(self.teacher_index)], self.field]

    def teacher_outputs(self, residual: torch.Tensor):
        """(aligned features, attention logits of the aligned teacher blocks) from the cached residual."""
        with torch.no_grad(), self.autocast():
            return self.teacher.forward_from(residual, self.start_block, self.config.teacher_blocks)

    def loss(self, student_attn, teacher_attn) -> torch.Tensor:
        """The attention alignment term (unweighted; the caller applies ``config.attn_coeff``)."""
        return attention_alignment_loss(student_attn, teacher_attn, self.config.student_blocks, None,
                                        self.config.heads)


def setup_haste(provenance: dict, model_kwargs: dict, attn_coeff: float, early_stop_point: int, device,
                autocast: Callable = nullcontext) -> HasteOnline:
    """The layer/head mapping from the shards' HASTE provenance and the SiT, validated; the teacher loads lazily."""
    info = provenance["haste"]
    ti = int(info.get("teacher", 0))
    meta = provenance["teachers"][ti]
    t_depth, t_heads = int(meta.get("depth", 12)), int(meta.get("heads", 12))
    attn_blocks = tuple(int(b) for b in info.get("attn_blocks", range(t_depth - 4, t_depth)))
    config = default_haste_config(model_kwargs["encoder_depth"], model_kwargs["num_heads"], t_depth, t_heads,
                                  num_pairs=len(attn_blocks), teacher_blocks=attn_blocks,
                                  attn_coeff=attn_coeff, early_stop_point=early_stop_point)
    config.validate(model_kwargs["depth"], model_kwargs["num_heads"], model_kwargs["encoder_depth"],
                    t_depth, t_heads)
    start = int(info.get("start_block", min(attn_blocks)))
    if start > min(attn_blocks):
        raise ValueError(f"HASTE shards cache the residual entering teacher block {start}, after the first "
                         f"aligned block {min(attn_blocks)}; re-run repa-preprocess --haste")

    def load():
        teacher = load_teacher(meta["name"], int(provenance.get("resolution", 256)), device,
                               grid=tuple(meta["grid"]) if meta.get("grid") else None)
        return teacher.eval().requires_grad_(False)
    return HasteOnline(config, info.get("field", R.haste(ti)), ti, start, load, autocast)
