"""The training loss of one batch of dynamic KD.

``L = ce_alpha·CE + kd_alpha·mean_{i∈S}(w_kl,i·KD_i + w_pt,i·PT_i)``: CE over every labelled row, the
distillation term over the selected rows ``S`` only (zero when ``S`` is empty), with
``(w_kl, w_pt) = (λ_KL, 0)`` for ``kd``, ``(λ_KL, λ_PT)`` for ``pkd`` and
``(λ_KL·(1-u/U), λ_PT·u/U)`` for ``uncertainty``. Per row, ``KD_i`` and ``PT_i`` combine the
teachers: a single teacher or ``hard`` — the one teacher that answered the row; ``soft`` —
``Σ_j w_j·loss_j`` over the ladder with the weights of
:func:`~student_trainer.kd.selection.soft_teacher_weights` (two teachers:
``u/U·loss_small + (1-u/U)·loss_large``; batch mean of ``u/U`` for ``soft-batch``);
``ensemble`` — KD against the mean of every teacher's logits, PT averaged over them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from shared.teacher_api import TeacherAnswer
from student_trainer.data.tasks import UNLABELLED
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.config import KDConfig
from student_trainer.kd.losses import kd_loss, patient_loss
from student_trainer.kd.plan import TeacherPlan
from student_trainer.kd.selection import soft_teacher_weights, supervision_weights
from student_trainer.train.student import DistillStudent


def _teacher_weights(config: KDConfig, selected_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much each teacher's loss counts for each selected row (``hard`` routes, it does not weigh)."""
    n = selected_logits.shape[0]
    ones = torch.ones(n, device=selected_logits.device)
    roles = config.teacher_roles
    if config.teacher_selection in ("soft", "soft-batch"):
        weights = soft_teacher_weights(
            selected_logits, per_instance=config.teacher_selection == "soft", k=len(roles)
        )
        return dict(zip(roles, weights, strict=True))
    if config.teacher_selection == "ensemble":
        return {role: ones / len(roles) for role in roles}
    return {role: ones for role in roles}


def _student_features(
    hidden_states: tuple[torch.Tensor, ...], rows: torch.Tensor, kind: str, width: int
) -> torch.Tensor:
    """The student's ``m + 1`` states for ``rows``: ``[r, m+1, H]`` ([CLS]) or ``[r, m+1, width, H]``."""
    if kind == "cls":
        return torch.stack([h[rows, 0] for h in hidden_states], dim=1)
    return torch.stack([h[rows, :width] for h in hidden_states], dim=1)


def distillation_loss(
    config: KDConfig,
    student: DistillStudent,
    logits: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None,
    batch: Mapping[str, torch.Tensor],
    plan: TeacherPlan,
    answers: Mapping[str, TeacherAnswer],
    alignments: Mapping[str, LayerAlignment],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (for logging); see the module docstring."""
    labels = batch["labels"]
    # Hidden labels (a transfer set) count nothing; with none left the term is zero, not NaN.
    labelled = bool((labels != UNLABELLED).any())
    ce = F.cross_entropy(logits, labels, ignore_index=UNLABELLED) if labelled else logits.new_zeros(())
    loss = config.ce_alpha * ce
    parts = {"ce": ce.item(), "kd": 0.0, "pt": 0.0, "w_kl": 0.0}
    n = len(plan.selected)
    if n == 0:
        return loss, parts

    device = logits.device
    selected_logits = logits[plan.selected]
    weights = _teacher_weights(config, selected_logits)
    kd_per_row = torch.zeros(n, device=device)
    pt_per_row = torch.zeros(n, device=device)
    if config.teacher_selection == "ensemble":
        mean_logits = torch.stack([answers[r].logits.to(device) for r in config.teacher_roles])
        mean_logits = mean_logits.mean(dim=0)
        kd_per_row = kd_loss(selected_logits, mean_logits, config.kd_loss, config.temperature)
    for role, answer in answers.items():
        positions = plan.routes[role]
        weight = weights[role][positions]
        if config.teacher_selection != "ensemble":
            kd = kd_loss(
                selected_logits[positions], answer.logits.to(device), config.kd_loss, config.temperature
            )
            kd_per_row = kd_per_row.index_add(0, positions, weight * kd)
        if config.uses_hidden_states:
            rows = plan.selected[positions]
            teacher_states = answer.hidden_cls if config.pt_features == "cls" else answer.hidden_states
            width = teacher_states.shape[2] if config.pt_features == "all-tokens" else 0  # the query's length
            student_states = student.projections[role](
                _student_features(hidden_states, rows, config.pt_features, width)
            )
            mask = batch["attention_mask"][rows, :width] if config.pt_features == "all-tokens" else None
            pt = patient_loss(student_states, alignments[role].gather(teacher_states.to(device)), mask)
            pt_per_row = pt_per_row.index_add(0, positions, weight * pt)

    if config.supervision == "uncertainty":
        w_kl, w_pt = supervision_weights(selected_logits, config.lambda_kl, config.lambda_pt)
    else:
        w_kl, w_pt = config.lambda_kl, (config.lambda_pt if config.supervision == "pkd" else 0.0)
    distill = (w_kl * kd_per_row + w_pt * pt_per_row).mean()
    mean_w_kl = float(w_kl.mean()) if isinstance(w_kl, torch.Tensor) else float(w_kl)  # Fig. 6's curve
    parts.update(kd=kd_per_row.mean().item(), pt=pt_per_row.mean().item(), w_kl=mean_w_kl)
    return loss + config.kd_alpha * distill, parts
