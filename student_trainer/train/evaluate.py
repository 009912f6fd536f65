"""Evaluation for `distill` and `finetune`: the task's metric for the ``Trainer``, and the majority-class
baseline a student must beat."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from transformers import EvalPrediction

from student_trainer.data.tasks import UNLABELLED
from student_trainer.train.metrics import compute_metrics


def metric_function(metric: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """The ``Trainer``'s ``compute_metrics``: accuracy and the task's ``metric`` of the predictions."""

    def scores(prediction: EvalPrediction) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        found = compute_metrics(metric, np.asarray(logits).argmax(axis=-1), np.asarray(prediction.label_ids))
        return {k: float(v) for k, v in found.items()}

    return scores


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
