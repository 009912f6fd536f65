"""How unsure the student is about each instance, from its own logits.

Dynamic KD reads these off the student's training forward pass, so they cost nothing
extra. Every function maps logits ``[B, K]`` to one score per instance ``[B]``.
"""

from __future__ import annotations

import math

import torch

#: Strategies whose scores rank instances; ``margin`` is the one where *smaller* is less sure.
UNCERTAINTY_KINDS = ("entropy", "margin", "lc")


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """Raise a ``ValueError`` naming ``name`` unless it is a float ``[B, K]`` tensor with K >= 2."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, num_labels], got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (K >= 2), got K = {logits.shape[1]}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")


def max_entropy(num_labels: int) -> float:
    """``U = ln K``: the entropy of the uniform distribution, the largest any prediction has."""
    if int(num_labels) != num_labels or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    return math.log(num_labels)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 up to fp32; fp64 stays, so rankings can ask for the precision they need."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``u_i = -Σ_k p_ik ln p_ik`` with ``p = softmax(logits)`` (natural log); larger = less sure.

    Near its maximum ``ln K`` entropy is flat (quadratic in the gap between logits): in fp32,
    rows whose logits differ by less than ~1e-3 all score exactly ``ln 2``. Rank in fp64.
    """
    check_logits(logits)
    log_p = torch.log_softmax(_at_least_fp32(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """``p_(1) - p_(2)``: top-1 minus top-2 probability; *smaller* = less sure."""
    check_logits(logits)
    top2 = torch.softmax(_at_least_fp32(logits), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def least_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``1 - max_k p_k``; larger = less sure."""
    check_logits(logits)
    return 1.0 - torch.softmax(_at_least_fp32(logits), dim=-1).max(dim=-1).values


def uncertainty_scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores where *larger always means less sure*, so one descending sort ranks any kind."""
    if kind == "entropy":
        return entropy(logits)
    if kind == "margin":
        return -margin(logits)
    if kind == "lc":
        return least_confidence(logits)
    raise ValueError(f"kind must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
