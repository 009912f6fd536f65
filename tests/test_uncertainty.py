import math

import pytest
import torch

from shared.uncertainty import entropy, least_confidence, margin, max_entropy, uncertainty_scores


@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_logits_have_maximum_entropy(k):
    logits = torch.zeros(4, k)
    assert torch.allclose(entropy(logits), torch.full((4,), math.log(k)))
    assert max_entropy(k) == pytest.approx(math.log(k))
    assert torch.allclose(margin(logits), torch.zeros(4))
    assert torch.allclose(least_confidence(logits), torch.full((4,), 1 - 1 / k))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_one_hot_like_logits_are_certain(k):
    logits = torch.full((3, k), -50.0)
    logits[:, 0] = 50.0
    assert torch.all(entropy(logits) < 1e-6)
    assert torch.allclose(margin(logits), torch.ones(3))
    assert torch.all(least_confidence(logits) < 1e-6)


def test_hand_checked_values_k3():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    logits = probs.log()
    expected = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert entropy(logits).item() == pytest.approx(expected, abs=1e-6)
    assert margin(logits).item() == pytest.approx(0.2, abs=1e-6)
    assert least_confidence(logits).item() == pytest.approx(0.5, abs=1e-6)


def test_scores_rank_less_sure_higher_for_every_kind():
    sure, unsure = [8.0, 0.0, 0.0], [1.0, 0.9, 0.8]
    logits = torch.tensor([sure, unsure])
    for kind in ("entropy", "margin", "lc"):
        scores = uncertainty_scores(logits, kind)
        assert scores[1] > scores[0], kind


def test_large_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0]])
    assert torch.isfinite(entropy(logits)).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(4), "shape"),
        (torch.zeros(2, 1), "K >= 2"),
        (torch.zeros(2, 3, dtype=torch.long), "floating"),
        ([[0.0, 1.0]], "torch.Tensor"),
    ],
)
def test_bad_logits_raise_value_error_naming_argument(bad, message):
    with pytest.raises(ValueError, match="logits") as info:
        entropy(bad)
    assert message in str(info.value)


@pytest.mark.parametrize("k", [1, 0, 2.5])
def test_max_entropy_rejects_bad_k(k):
    with pytest.raises(ValueError, match="num_labels"):
        max_entropy(k)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        uncertainty_scores(torch.zeros(2, 2), "variance")
