"""BERT's optimizer (AdamW, no decay on biases and LayerNorm weights) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from transformers import get_scheduler

from student_trainer.args.distill import DistillArguments


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


def make_optimizer(
    model: torch.nn.Module, args: DistillArguments, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """BERT's AdamW (no decay on biases and LayerNorm weights) and the HF learning-rate schedule."""
    optimizer = adamw_with_decay_groups(
        model.parameters(),
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    return optimizer, get_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps)
