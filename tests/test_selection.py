import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.uncertainty import entropy, max_entropy, uncertainty_scores
from student_trainer.kd.selection import (
    ExactBudgetSelector,
    hard_split,
    num_selected,
    select_instances,
    soft_teacher_weights,
    supervision_weights,
)


def graded_logits(batch: int, k: int = 3) -> torch.Tensor:
    """Instance i is more confident than instance i-1: entropy strictly decreasing in i."""
    logits = torch.zeros(batch, k)
    logits[:, 0] = torch.arange(batch, dtype=torch.float32)
    return logits


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("strategy", ["entropy", "margin", "lc", "random"])
def test_selects_int_b_times_r(strategy, ratio):
    logits = graded_logits(10)
    idx = select_instances(logits, strategy, ratio, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long
    assert len(idx) == int(10 * ratio)
    assert len(set(idx.tolist())) == len(idx)


@pytest.mark.parametrize("strategy", ["entropy", "margin", "lc"])
def test_most_uncertain_first(strategy):
    idx = select_instances(graded_logits(10), strategy, 0.5)
    assert idx.tolist() == [0, 1, 2, 3, 4]


def test_none_selects_all_and_ignores_ratio():
    assert select_instances(graded_logits(5), "none", 0.2).tolist() == [0, 1, 2, 3, 4]


def test_random_is_seeded():
    a = select_instances(graded_logits(20), "random", 0.5, generator=torch.Generator().manual_seed(7))
    b = select_instances(graded_logits(20), "random", 0.5, generator=torch.Generator().manual_seed(7))
    assert a.tolist() == b.tolist()


def test_ties_break_by_index():
    logits = torch.zeros(6, 2)  # all equally uncertain
    assert select_instances(logits, "entropy", 0.5).tolist() == [0, 1, 2]


def test_an_unsure_student_is_ranked_not_tied():
    """With two classes entropy, margin and least confidence order rows alike; an untrained student
    (logit gaps of 1e-5 .. 1e-3) must not make entropy's fp32 ties pick rows by position instead."""
    gaps = torch.tensor([3e-5, 9e-4, 1e-5, 4e-4, 2e-4, 6e-5, 1e-4, 7e-4])
    logits = torch.stack([torch.zeros_like(gaps), gaps], dim=1)
    expected = torch.argsort(gaps)  # smallest gap = least sure
    for strategy in ("entropy", "margin", "lc"):
        assert select_instances(logits, strategy, 0.5).tolist() == expected[:4].tolist(), strategy
    small, large = hard_split(logits)
    assert small.tolist() == expected[:4].tolist() and sorted(large.tolist()) == sorted(expected[4:].tolist())


def test_float_ratio_rounding_is_robust():
    assert num_selected(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996 in binary
    assert num_selected(32, 0.1) == 3


def test_zero_selection_gives_empty_index_and_no_nan_downstream():
    from student_trainer.kd.losses import kd_loss

    logits = graded_logits(4).requires_grad_()
    idx = select_instances(logits, "entropy", 0.0)
    assert idx.numel() == 0
    per_instance = kd_loss(logits[idx], torch.zeros(0, 3))
    term = per_instance.sum() / max(1, idx.numel())
    assert term.item() == 0.0
    term.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"strategy": "variance", "ratio": 0.5}, "strategy"),
        ({"strategy": "entropy", "ratio": 1.5}, "ratio"),
        ({"strategy": "entropy", "ratio": -0.1}, "ratio"),
        ({"strategy": "entropy", "ratio": "half"}, "ratio"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        select_instances(graded_logits(4), **kwargs)


def test_bad_logits_shape_is_a_value_error():
    with pytest.raises(ValueError, match="logits"):
        select_instances(torch.zeros(4), "entropy", 0.5)


def test_exact_budget_totals_round_n_r_over_an_epoch():
    selector = ExactBudgetSelector("entropy", 0.1)
    sizes = [32] * 31 + [8]  # N = 1000
    total = sum(len(selector.select(graded_logits(b))) for b in sizes)
    assert total == round(1000 * 0.1)
    plain = sum(len(select_instances(graded_logits(b), "entropy", 0.1)) for b in sizes)
    assert plain == 31 * 3 + 0  # what int(B·r) alone loses


def test_exact_budget_state_round_trips():
    a = ExactBudgetSelector("entropy", 0.3)
    a.select(graded_logits(7))
    b = ExactBudgetSelector("entropy", 0.3)
    b.load_state_dict(a.state_dict())
    assert len(a.select(graded_logits(7))) == len(b.select(graded_logits(7)))
    a.reset()
    assert a.state_dict() == {"carry": 0.5}


@pytest.mark.parametrize("batch", [1, 2, 5, 6])
def test_hard_split_halves(batch):
    small, large = hard_split(graded_logits(batch))
    assert len(small) == batch // 2
    assert len(large) == batch - batch // 2
    # least confident half -> small teacher
    assert small.tolist() == list(range(batch // 2))


def test_hard_split_single_instance_goes_to_large_teacher():
    small, large = hard_split(torch.zeros(1, 2))
    assert small.numel() == 0 and large.tolist() == [0]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_soft_weights_follow_relative_entropy(k):
    logits = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    w_small, w_large = soft_teacher_weights(logits)
    expected = entropy(logits) / math.log(k)
    assert torch.allclose(w_small, expected, atol=1e-6)
    assert torch.allclose(w_small + w_large, torch.ones(6))
    w_small_b, w_large_b = soft_teacher_weights(logits, per_instance=False)
    assert torch.allclose(w_small_b, expected.mean().expand(6), atol=1e-6)
    assert torch.allclose(w_small_b + w_large_b, torch.ones(6))


def test_supervision_weights_and_lambdas():
    logits = torch.zeros(2, 4)
    logits[1, 0] = 100.0  # row 0 uniform (u = U), row 1 certain (u = 0)
    w_kl, w_pt = supervision_weights(logits, lambda_kl=2.0, lambda_pt=3.0)
    assert torch.allclose(w_kl, torch.tensor([0.0, 2.0]), atol=1e-5)
    assert torch.allclose(w_pt, torch.tensor([3.0, 0.0]), atol=1e-5)


def test_weights_are_detached():
    logits = torch.randn(4, 3, requires_grad=True)
    for weights in (*soft_teacher_weights(logits), *supervision_weights(logits)):
        assert not weights.requires_grad


logit_batches = st.integers(1, 24).flatmap(
    lambda b: st.tuples(
        st.integers(2, 6),
        st.integers(0, 2**31 - 1),
    ).map(lambda ks: torch.randn(b, ks[0], generator=torch.Generator().manual_seed(ks[1])) * 3)
)


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches, ratio=st.floats(0.0, 1.0), strategy=st.sampled_from(["entropy", "margin", "lc"]))
def test_property_selection_is_exactly_the_n_most_uncertain(logits, ratio, strategy):
    idx = select_instances(logits, strategy, ratio)
    n = num_selected(logits.shape[0], ratio)
    assert len(idx) == n == len(set(idx.tolist()))
    assert all(0 <= i < logits.shape[0] for i in idx.tolist())
    scores = uncertainty_scores(logits, strategy)
    rest = sorted(set(range(logits.shape[0])) - set(idx.tolist()))
    if n and rest:
        assert scores[idx].min() >= scores[rest].max()


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches, ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_property_random_selection_unique_in_range(logits, ratio, seed):
    idx = select_instances(logits, "random", ratio, generator=torch.Generator().manual_seed(seed))
    assert len(idx) == num_selected(logits.shape[0], ratio) == len(set(idx.tolist()))
    assert all(0 <= i < logits.shape[0] for i in idx.tolist())


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches)
def test_property_hard_split_is_a_partition(logits):
    small, large = hard_split(logits)
    assert sorted(small.tolist() + large.tolist()) == list(range(logits.shape[0]))
    u = entropy(logits)
    if len(small) and len(large):
        assert u[small].min() >= u[large].max()


@settings(max_examples=60, deadline=None)
@given(logits=logit_batches, per_instance=st.booleans())
def test_property_soft_weights_sum_to_one_in_unit_range(logits, per_instance):
    w_small, w_large = soft_teacher_weights(logits, per_instance=per_instance)
    assert torch.allclose(w_small + w_large, torch.ones_like(w_small))
    assert (w_small >= 0).all() and (w_small <= 1).all()
    assert (entropy(logits) <= max_entropy(logits.shape[1]) + 1e-5).all()
