"""Evaluation: the loss and the task's metric on an evaluation set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from student_trainer.data.tokenized import TokenizedDataset, collate_batch
from student_trainer.train.metrics import compute_metrics
from student_trainer.train.student import DistillStudent


@torch.no_grad()
def evaluate(
    student: DistillStudent,
    dataset: TokenizedDataset,
    metric: str,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Loss and the task metric on the evaluation set (consumes no RNG, so resume stays exact)."""
    student.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_batch(items, pad_id).items()}
        logits, _ = student(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    student.train()
    scores = compute_metrics(metric, torch.cat(predictions), torch.cat(labels))
    return {"eval_loss": loss_sum / len(dataset), **{f"eval_{k}": float(v) for k, v in scores.items()}}
