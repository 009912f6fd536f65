"""One evaluation for `distill` and `finetune`: the loss and the task's metric on a labelled set."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from student_trainer.data.tasks import UNLABELLED
from student_trainer.data.tokenized import TokenizedDataset, collate_batch, model_inputs
from student_trainer.train.metrics import compute_metrics


@torch.inference_mode()
def evaluate(
    model: PreTrainedModel, dataset: TokenizedDataset, metric: str, pad_token_id: int, batch_size: int
) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and ``eval_<metric>`` (accuracy always) over ``dataset``.

    Consumes no RNG and puts the model back in the mode it was in, so a resumed run stays exact.
    """
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    predictions, labels, loss_sum = [], [], 0.0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_batch(items, pad_token_id).items()}
        logits = model(**model_inputs(batch)).logits.float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    model.train(training)
    scores = compute_metrics(metric, torch.cat(predictions), torch.cat(labels))
    return {"eval_loss": loss_sum / len(dataset), **{f"eval_{k}": float(v) for k, v in scores.items()}}


def majority_baseline(
    train_labels: list[int], eval_labels: list[int], metric: str, label_names: list[str]
) -> dict[str, float | str]:
    """What always predicting the most frequent training label scores on the evaluation set.

    A student that does not beat it learned nothing usable (an unbalanced dev set makes a high
    accuracy look better than it is). Ties go to the lower label index. Training rows without
    labels (a transfer set) have no majority: the evaluation set's own, a baseline as hard to beat.
    """
    counts = Counter(label for label in train_labels if label != UNLABELLED) or Counter(eval_labels)
    label = min(counts, key=lambda k: (-counts[k], k))
    scores = compute_metrics(metric, [label] * len(eval_labels), eval_labels)
    return {
        "label": label_names[label],
        "metric": metric,
        **{f"eval_{k}": float(v) for k, v in scores.items()},
    }
