"""One evaluation for `distill` and `finetune`: the loss and the task's metric on a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

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
