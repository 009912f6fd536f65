"""A teacher budget and a ladder of teachers: parsing, pacing, buying rows, k-teacher routing and
weights; the paper's methods as the special cases (a 10 % budget = r = 0.1; k = 2 = today's hard/soft)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.teacher_api import TeacherInfo
from shared.uncertainty import entropy, max_entropy
from student_trainer.kd.budget import (
    BatchCosts,
    BudgetPacer,
    TeacherBudget,
    buy_rows,
    buying_order,
    unit_costs,
)
from student_trainer.kd.config import KDConfig
from student_trainer.kd.ledger import requested_counts, row_costs
from student_trainer.kd.objective import distillation_loss
from student_trainer.kd.plan import batch_teams, plan_batch, routed_costs
from student_trainer.kd.selection import hard_split, select_instances, soft_teacher_weights
from student_trainer.train.setup import RowSelector, ladder_order
from tests.test_distill_kd_step import ALIGN, fake_answer, make_batch, make_student

TINY = TeacherInfo("t", 2, 32, 2, ("a", "b"), 100, 64)
MID = TeacherInfo("m", 4, 48, 2, ("a", "b"), 100, 64)
BIG = TeacherInfo("b", 6, 64, 2, ("a", "b"), 100, 64)


def logits_of(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed)) * 2


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "flops", "fraction"),
    [
        ("500GF", 500 * 10**9, None),
        ("2TF", 2 * 10**12, None),
        ("2.5tf", 2_500_000_000_000, None),
        ("1e12", 10**12, None),
        ("10%", None, Fraction(1, 10)),
        ("12.5%", None, Fraction(1, 8)),
        ("100%", None, Fraction(1)),
    ],
)
def test_budgets_parse_exactly(spec: str, flops: int | None, fraction: Fraction | None) -> None:
    assert TeacherBudget.parse(spec) == TeacherBudget(flops=flops, fraction=fraction)


@pytest.mark.parametrize(
    ("spec", "amount", "unit"),
    [("5000calls", 5000, "calls"), ("1call", 1, "calls"), ("2Mtok", 2 * 10**6, "tokens"),
     ("1.5ktokens", 1500, "tokens"), ("300 tok", 300, "tokens")],
)  # fmt: skip
def test_budgets_in_calls_and_tokens_parse_exactly(spec: str, amount: int, unit: str) -> None:
    assert TeacherBudget.parse(spec) == TeacherBudget(flops=amount, unit=unit)


def test_calls_and_tokens_price_rows_by_their_unit() -> None:
    flops, lengths = {"a": [100, 300], "b": [7, 9]}, {"a": [3, 5], "b": [4, 6]}
    assert unit_costs("calls", flops, lengths) == {"a": [1, 1], "b": [1, 1]}
    assert unit_costs("tokens", flops, lengths) == lengths
    assert unit_costs("flops", flops, lengths) == flops


@pytest.mark.parametrize(
    "spec", ["", "abc", "10", "%", "0%", "101%", "-5GF", "0GF", "0.1F", "5 XF", "1e12%", "0.5calls", "5Ttok"]
)
def test_bad_budgets_say_what_is_wrong(spec: str) -> None:
    if spec == "10":  # a plain number is FLOPs: ten of them is a (tiny) budget
        assert TeacherBudget.parse(spec).flops == 10
        return
    with pytest.raises(ValueError, match="--teacher_budget"):
        TeacherBudget.parse(spec)


# -- pacing: the spend never exceeds the budget -------------------------------------------------------


def run_pacer(
    budget: TeacherBudget, batches: list[list[int]], strategy: str, seed: int, flops: bool = True
) -> list[dict]:
    """A whole run of batches whose rows have the given lengths, one teacher: each step's record
    (``flops=False``: the lengths are the costs themselves, small enough that one FLOP matters)."""
    pacer, records = BudgetPacer(budget, total_steps=len(batches)), []
    generator = torch.Generator().manual_seed(seed)
    for step, lengths in enumerate(batches, start=1):
        costs = row_costs({"t": TINY}, lengths)["t"] if flops else lengths
        routed = torch.tensor(costs, dtype=torch.int64)
        before = pacer.spent
        chosen = pacer.select(
            logits_of(len(lengths), seed + step), BatchCosts(routed, sum(costs)), strategy, generator
        )
        records.append(
            {
                "step": step,
                "spent": pacer.spent,
                "bought": sum(costs[i] for i in chosen.tolist()),
                "delta": pacer.spent - before,
                "bound": budget.bound(step, len(batches), pacer.vanilla),
                "rows": chosen.tolist(),
                "vanilla": pacer.vanilla,
            }
        )
    return records


runs = st.lists(st.lists(st.integers(1, 128), min_size=1, max_size=40), min_size=1, max_size=12)
budgets = st.one_of(
    st.integers(1, 10**9).map(lambda f: TeacherBudget(flops=f)),
    st.fractions(Fraction(1, 1000), Fraction(1)).map(lambda f: TeacherBudget(fraction=f)),
)


@settings(max_examples=100, deadline=None)
@given(
    batches=runs,
    budget=budgets,
    strategy=st.sampled_from(["entropy", "margin", "lc", "random"]),
    seed=st.integers(0, 99),
)
def test_property_the_spend_never_exceeds_the_budget(batches, budget, strategy, seed) -> None:
    check_run(budget, run_pacer(budget, batches, strategy, seed))


@settings(max_examples=100, deadline=None)
@given(
    batches=runs,
    budget=st.one_of(
        st.integers(1, 3000).map(lambda f: TeacherBudget(flops=f)),
        st.fractions(Fraction(1, 100), Fraction(1)).map(lambda f: TeacherBudget(fraction=f)),
    ),
    strategy=st.sampled_from(["entropy", "random"]),
)
def test_property_the_spend_never_exceeds_the_budget_by_one_flop(batches, budget, strategy) -> None:
    check_run(budget, run_pacer(budget, batches, strategy, 0, flops=False))


def check_run(budget: TeacherBudget, records: list[dict]) -> None:
    for record in records:
        assert record["delta"] == record["bought"]  # the pacer records exactly what the rows cost
        assert record["spent"] <= record["bound"]  # spend so far <= budget x progress, every step
        assert len(set(record["rows"])) == len(record["rows"])
    whole = budget.flops if budget.fraction is None else math.floor(budget.fraction * records[-1]["vanilla"])
    assert records[-1]["spent"] <= whole
    assert records[-1]["bound"] == whole


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.integers(1, 50), min_size=1, max_size=30), allowance=st.integers(0, 400))
def test_property_buying_fills_greedily_and_never_overspends(costs, allowance) -> None:
    order = list(range(len(costs)))[::-1]
    chosen, spent = buy_rows(order, torch.tensor(costs), allowance)
    assert spent == sum(costs[i] for i in chosen) <= allowance
    assert chosen == [i for i in order if i in chosen]  # in the order given
    assert all(costs[i] > allowance - spent for i in set(order) - set(chosen))  # nothing left fits


def test_what_a_batch_leaves_unused_carries_over() -> None:
    budget = TeacherBudget(flops=1000)
    pacer = BudgetPacer(budget, total_steps=4)
    costs = BatchCosts(torch.tensor([300, 300]), 600)
    assert pacer.allowance(costs.vanilla) == 250
    assert pacer.select(logits_of(2, 0), costs, "entropy", None).tolist() == []  # 300 does not fit in 250
    assert pacer.allowance(costs.vanilla) == 500  # 250 left unused + 250 of step 2
    assert len(pacer.select(logits_of(2, 1), costs, "entropy", None)) == 1
    assert (pacer.spent, pacer.allowance(costs.vanilla)) == (300, 450)


def test_value_per_flop_prefers_cheap_rows_of_equal_uncertainty() -> None:
    logits = torch.zeros(3, 2)  # equally unsure
    assert buying_order(logits, torch.tensor([30, 10, 20]), "entropy") == [1, 2, 0]
    logits = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0]])  # row 1 is sure: worth little per FLOP
    assert buying_order(logits, torch.tensor([10, 10, 10]), "margin") == [0, 2, 1]
    assert buying_order(logits, torch.tensor([10, 10, 10]), "random", torch.Generator().manual_seed(0)) == (
        torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()  # random ignores the cost
    )


# -- the paper's ratio as a special case ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["entropy", "margin", "lc", "random"])
def test_ten_percent_of_equal_rows_on_one_teacher_selects_what_r_one_tenth_does(strategy: str) -> None:
    config = KDConfig(teacher_selection="large", data_selection=strategy, teacher_budget="10%")
    budgeted = RowSelector.build(config, seed=5, total_steps=6)
    ratio = RowSelector.build(
        KDConfig(teacher_selection="large", data_selection=strategy, selection_ratio=0.1), 5
    )
    infos = {"large": MID}
    for step in range(6):
        logits = logits_of(30, step)  # int(30 x 0.1) = 3 rows: no fraction for the ratio to lose
        costs = row_costs(infos, [17] * 30)
        vanilla = sum(costs["large"])
        chosen = budgeted.select(logits, BatchCosts(routed_costs(config, logits, costs), vanilla))
        assert torch.equal(chosen, ratio.select(logits)), step  # the same rows, in the same order
    assert budgeted.pacer.spent == 6 * 3 * costs["large"][0]


# -- a ladder of teachers ----------------------------------------------------------------------------


def test_the_ladder_is_ordered_by_flops_per_token_whatever_the_names() -> None:
    assert ladder_order({"big": BIG, "tiny": TINY, "mid": MID}) == ("tiny", "mid", "big")
    assert ladder_order({"large": MID, "small": TINY}) == ("small", "large")
    assert ladder_order({"b": MID, "a": MID}) == ("b", "a")  # ties: the command line's order


@pytest.mark.parametrize("batch", [1, 2, 5, 6, 9])
def test_hard_with_two_teachers_is_the_papers_split_bit_for_bit(batch: int) -> None:
    logits = logits_of(batch, batch)
    order = torch.sort(entropy(logits), descending=True, stable=True).indices  # today's hard_split
    small, large = hard_split(logits)
    assert torch.equal(small, order[: batch // 2]) and torch.equal(large, order[batch // 2 :])


@pytest.mark.parametrize("per_instance", [True, False])
def test_soft_with_two_teachers_is_u_over_U_bit_for_bit(per_instance: bool) -> None:
    logits = logits_of(7, 3)
    u = (entropy(logits) / max_entropy(3)).clamp(0.0, 1.0)  # today's soft weights
    if not per_instance:
        u = u.mean().expand_as(u).clone()
    w_small, w_large = soft_teacher_weights(logits, per_instance=per_instance)
    assert torch.equal(w_small, u) and torch.equal(w_large, 1.0 - u)


@pytest.mark.parametrize(("batch", "k"), [(9, 3), (10, 3), (2, 3), (12, 4)])
def test_hard_splits_k_ways_most_uncertain_to_the_smallest(batch: int, k: int) -> None:
    logits = logits_of(batch, k)
    groups = hard_split(logits, k)
    assert [len(g) for g in groups] == [(i + 1) * batch // k - i * batch // k for i in range(k)]
    assert sorted(torch.cat(groups).tolist()) == list(range(batch))
    u = entropy(logits)
    for smaller, larger in zip(groups, groups[1:], strict=False):
        if len(smaller) and len(larger):
            assert u[smaller].min() >= u[larger].max()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 6), per_instance=st.booleans())
def test_property_soft_weights_of_k_teachers_sum_to_one(seed: int, k: int, per_instance: bool) -> None:
    logits = logits_of(8, seed)
    weights = torch.stack(soft_teacher_weights(logits, per_instance=per_instance, k=k))
    assert weights.shape == (k, 8)
    assert torch.allclose(weights.sum(dim=0), torch.ones(8), atol=1e-6)
    assert (weights >= 0).all() and (weights <= 1).all()


def test_soft_weights_lean_on_the_small_teachers_when_unsure() -> None:
    sure, unsure = torch.tensor([[9.0, 0.0, 0.0]]), torch.zeros(1, 3)
    assert [float(w) for w in soft_teacher_weights(unsure, k=3)] == [1.0, 0.0, 0.0]
    assert [float(w) for w in soft_teacher_weights(sure, k=3)][2] > 0.99


KD_TWO = dict(data_selection="entropy", selection_ratio=0.75, supervision="uncertainty")


@pytest.mark.parametrize("selection", ["hard", "soft", "soft-batch", "ensemble"])
def test_the_ladder_of_two_gives_todays_loss_bit_for_bit(selection: str) -> None:
    """The same two teachers named small/large and as a ladder a/b: the same rows, the same loss."""
    results = []
    for names in (("small", "large"), ("a", "b")):
        config = KDConfig(teacher_selection=selection, ladder=names, **KD_TWO)
        rename = dict(zip(names, ("small", "large"), strict=True))
        student = make_student(KDConfig(teacher_selection=selection, **KD_TWO))
        student.projections = torch.nn.ModuleDict({n: student.projections[rename[n]] for n in names})
        batch = make_batch()
        logits, hidden = student(batch, output_hidden_states=True)
        select = lambda lg: select_instances(lg, "entropy", 0.75)  # noqa: E731
        alignments = {n: ALIGN[rename[n]] for n in names}
        plan = plan_batch(config, logits, batch, select, alignments)
        answers = {n: fake_answer(q, rename[n], i) for i, (n, q) in enumerate(plan.queries.items())}
        loss, parts = distillation_loss(config, student, logits, hidden, batch, plan, answers, alignments)
        results.append((plan, loss, parts))
    (plan_a, loss_a, parts_a), (plan_b, loss_b, parts_b) = results
    assert torch.equal(plan_a.selected, plan_b.selected)
    assert [r.tolist() for r in plan_a.routes.values()] == [r.tolist() for r in plan_b.routes.values()]
    assert torch.equal(loss_a, loss_b) and parts_a == parts_b


def test_a_budgeted_hard_costs_each_row_on_the_teacher_it_goes_to() -> None:
    roles = ("t", "m", "b")
    config = KDConfig(teacher_selection="hard", ladder=roles, data_selection="lc", teacher_budget="40%")
    infos = {"t": TINY, "m": MID, "b": BIG}
    batch = make_batch()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    logits = logits_of(len(lengths), 11)
    costs = row_costs(infos, lengths)
    routed = routed_costs(config, logits, costs)
    teams = batch_teams(logits, 3)
    assert routed.tolist() == [costs[roles[team]][row] for row, team in enumerate(teams.tolist())]
    selector = RowSelector.build(config, seed=0, total_steps=1)
    vanilla = sum(map(sum, costs.values()))
    plan = plan_batch(
        config, logits, batch, lambda lg: selector.select(lg, BatchCosts(routed, vanilla)), ALIGN_3
    )
    sent = {role: batch["attention_mask"][plan.sent_rows(role)].sum(dim=1).tolist() for role in plan.queries}
    requested = sum(requested_counts(infos, sent).values())
    assert requested == selector.pacer.spent <= math.floor(Fraction(2, 5) * vanilla)
    assert len(plan.selected) > 0
    for role in plan.queries:  # each row went to its batch group's teacher
        assert (teams[plan.sent_rows(role)] == roles.index(role)).all()


ALIGN_3 = {role: ALIGN["small"] for role in ("t", "m", "b")}
