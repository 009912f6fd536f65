"""Distillation losses, one value per instance so selection and weights compose freely."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.uncertainty import check_logits

KD_LOSS_KINDS = ("kl", "mse")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-instance loss between student and teacher logits, ``[B]``.

    * ``kl``: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al.; the ``T²`` keeps the
      gradient scale independent of ``T``);
    * ``mse``: ``mean_k (s_k - t_k)²`` on raw logits (what the reference experiments used).

    The teacher side is detached: only the student learns.
    """
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if kind not in KD_LOSS_KINDS:
        raise ValueError(f"kind must be one of {KD_LOSS_KINDS}, got {kind!r}")
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl * temperature**2


def patient_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patient (PKD) loss per instance, ``[B]``: ``Σ_j ‖h^s_j/‖h^s_j‖ - h^t_j/‖h^t_j‖‖²``.

    Inputs are the aligned layers' features, already projected to one width:
    ``[B, J, H]`` ([CLS] vectors) or ``[B, J, L, H]`` (every token, ``all-tokens``). For
    tokens, the per-layer distance is averaged over the positions ``mask`` ``[B, L]`` marks
    as real (padding never counts; an instance with no real token contributes 0).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} != student_hidden shape "
            f"{tuple(student_hidden.shape)}"
        )
    if student_hidden.dim() not in (3, 4):
        raise ValueError(
            f"student_hidden must be [B, J, H] or [B, J, L, H], got {tuple(student_hidden.shape)}"
        )
    teacher_hidden = teacher_hidden.detach().to(student_hidden.dtype)
    distance = (F.normalize(student_hidden, dim=-1) - F.normalize(teacher_hidden, dim=-1)).pow(2).sum(-1)
    if student_hidden.dim() == 3:
        if mask is not None:
            raise ValueError("mask applies only to token features [B, J, L, H]")
        return distance.sum(dim=1)
    if mask is None:
        return distance.mean(dim=-1).sum(dim=1)
    batch, _, length, _ = student_hidden.shape
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape {(batch, length)}, got {tuple(mask.shape)}")
    weights = mask.to(distance.dtype).unsqueeze(1)  # [B, 1, L]
    per_layer = (distance * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    return per_layer.sum(dim=1)
