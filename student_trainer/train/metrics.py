"""Task metrics: accuracy, binary F1 (positive class 1), Matthews correlation.

Pure functions over label sequences (lists, numpy arrays or tensors); no sklearn at runtime.
Accuracy is always reported, so MRPC/QQP (F1) and CoLA (MCC) show it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("accuracy", "f1", "mcc")


def _as_int_array(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1: ``2·TP / (2·TP + FP + FN)``; 0 when there is no positive at all."""
    tp = int(((predictions == 1) & (labels == 1)).sum())
    fp = int(((predictions == 1) & (labels != 1)).sum())
    fn = int(((predictions != 1) & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin 2004) from the confusion matrix; 0 when undefined (a constant side).

    ``(c·s - Σ_k p_k·t_k) / sqrt((s² - Σ p_k²)(s² - Σ t_k²))`` with ``c`` correct, ``s`` samples,
    ``p_k``/``t_k`` predicted/true counts of class ``k``; the binary case is the usual MCC.
    """
    num_classes = int(max(predictions.max(), labels.max())) + 1
    predicted = np.bincount(predictions, minlength=num_classes).astype(np.float64)
    true = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = float((predictions == labels).sum())
    samples = float(len(labels))
    numerator = correct * samples - float(predicted @ true)
    denominator = math.sqrt((samples**2 - float(predicted @ predicted)) * (samples**2 - float(true @ true)))
    return numerator / denominator if denominator else 0.0


def compute_metrics(metric: str, predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """``{"accuracy": …}`` plus ``metric`` itself when it is ``f1`` or ``mcc``."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    predictions, labels = _as_int_array(predictions), _as_int_array(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no labels to score")
    if labels.min() < 0 or predictions.min() < 0:
        raise ValueError(
            "labels and predictions must be class indices >= 0 (unlabelled data cannot be scored)"
        )
    results = {"accuracy": accuracy(predictions, labels)}
    if metric == "f1":
        if labels.max() > 1 or predictions.max() > 1:
            raise ValueError("f1 is binary (positive class 1); labels must be 0 or 1")
        results["f1"] = binary_f1(predictions, labels)
    elif metric == "mcc":
        results["mcc"] = matthews_corrcoef(predictions, labels)
    return results


# How far above the majority baseline a student must score to count as having learned the task.
BASELINE_MARGIN = 0.01


def above_majority_baseline(evaluation: dict[str, float], baseline: dict[str, Any]) -> bool:
    """Whether the student beats the majority baseline by more than ``BASELINE_MARGIN`` on the task's
    own metric (``baseline["metric"]``), compared with the baseline's value of that same metric.

    The one rule behind ``above_majority_baseline`` in ``results.json``, the summary paragraph and
    the experiment report: a CoLA student at MCC 0.004 (the majority's is 0) with an accuracy below
    the majority's has not learned the task.
    """
    key = f"eval_{baseline['metric']}"
    return evaluation[key] - baseline[key] > BASELINE_MARGIN
