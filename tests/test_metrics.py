"""Task metrics on cases small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from student_trainer.train.metrics import compute_metrics


def test_accuracy_accepts_lists_arrays_and_tensors() -> None:
    assert compute_metrics("accuracy", [1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 0.5}
    assert compute_metrics("accuracy", np.array([2, 0]), torch.tensor([2, 0])) == {"accuracy": 1.0}


def test_binary_f1_hand_checked() -> None:
    # TP = 2 (idx 0, 2), FP = 1 (idx 3), FN = 1 (idx 1): F1 = 4 / (4 + 1 + 1) = 2/3; accuracy 3/5.
    result = compute_metrics("f1", [1, 0, 1, 1, 0], [1, 1, 1, 0, 0])
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert compute_metrics("f1", [0, 0], [0, 0])["f1"] == 0.0  # no positives anywhere
    assert compute_metrics("f1", [0, 0], [1, 1])["f1"] == 0.0


def test_mcc_hand_checked() -> None:
    # Binary: TP=2, TN=1, FP=1, FN=1 -> (2·1 - 1·1) / sqrt(3·3·2·2) = 1/6.
    assert compute_metrics("mcc", [1, 0, 1, 1, 0], [1, 1, 1, 0, 0])["mcc"] == pytest.approx(1 / 6)
    assert compute_metrics("mcc", [0, 1, 0, 1], [0, 1, 0, 1])["mcc"] == pytest.approx(1.0)
    assert compute_metrics("mcc", [1, 0, 1, 0], [0, 1, 0, 1])["mcc"] == pytest.approx(-1.0)
    assert compute_metrics("mcc", [1, 1, 1], [0, 1, 1])["mcc"] == 0.0  # constant prediction: undefined -> 0


def test_multiclass_mcc_hand_checked() -> None:
    # 3 classes: c = 3 correct of s = 4; predicted counts (1,2,1), true counts (1,1,2).
    # (3·4 - (1+2+2)) / sqrt((16 - 6)(16 - 6)) = 7 / 10.
    value = compute_metrics("mcc", [0, 1, 2, 1], [0, 1, 2, 2])["mcc"]
    assert value == pytest.approx(0.7)
    assert math.isfinite(value)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="not one of"):
        compute_metrics("bleu", [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        compute_metrics("accuracy", [0, 1], [0])
    with pytest.raises(ValueError, match="unlabelled"):
        compute_metrics("accuracy", [0], [-1])
    with pytest.raises(ValueError, match="binary"):
        compute_metrics("f1", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="no labels"):
        compute_metrics("accuracy", [], [])
