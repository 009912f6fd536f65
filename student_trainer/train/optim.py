"""Pieces every training loop here shares: where to run, and BERT's optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from shared.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when present; a bare ``cuda`` means this process's own GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def adamw_with_decay_groups(
    parameters: Iterable[torch.nn.Parameter],
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW where biases and LayerNorm weights (the 1-d parameters) are not decayed, as in BERT."""
    trainable = [p for p in parameters if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)
