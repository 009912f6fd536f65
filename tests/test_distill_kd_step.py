"""One batch of dynamic KD: rows and teachers chosen from the student's logits, queries, loss terms."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification

from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery
from student_trainer.kd.alignment import LayerAlignment, make_projection
from student_trainer.kd.config import KDConfig
from student_trainer.kd.losses import kd_loss, patient_loss
from student_trainer.kd.objective import distillation_loss
from student_trainer.kd.plan import plan_batch
from student_trainer.kd.selection import select_instances, soft_teacher_weights, supervision_weights
from student_trainer.teachers.client import TeacherCallError, TeacherRequestError, ask_teachers
from student_trainer.train.student import DistillStudent
from tests.tiny_models import tiny_config

LENGTHS = [5, 9, 3, 7, 6, 4, 8, 2]
ALIGN = {"small": LayerAlignment.between(2, 2), "large": LayerAlignment.between(2, 4)}
HIDDEN = {"small": 32, "large": 48}


def kd_args(**overrides) -> KDConfig:
    return KDConfig(**{"teacher_selection": "hard", **overrides})


def make_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in LENGTHS])
    ids = torch.randint(5, 90, (len(LENGTHS), width), generator=generator) * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.tensor([0, 1] * 4),
    }


def make_student(args: KDConfig) -> DistillStudent:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_layers=2))
    projections = (
        {r: make_projection(32, HIDDEN[r]) for r in args.teacher_roles} if args.uses_hidden_states else {}
    )
    return DistillStudent(model, projections)


def fake_answer(query: TeacherQuery, role: str, seed: int) -> TeacherAnswer:
    """Deterministic teacher outputs of the shapes the query asks for."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = query.input_ids.shape
    cls = (
        torch.randn(batch, len(query.cls_layers), HIDDEN[role], generator=generator)
        if query.cls_layers
        else None
    )
    tokens = (
        torch.randn(batch, len(query.token_layers), width, HIDDEN[role], generator=generator)
        if query.token_layers
        else None
    )
    return TeacherAnswer(torch.randn(batch, 2, generator=generator), cls, tokens, 1000 * batch, 0, 0)


def run(args: KDConfig, select=None):
    """Student forward, plan, fake answers, loss: what the trainer does for one batch."""
    student, batch = make_student(args), make_batch()
    logits, hidden = student(batch, output_hidden_states=args.uses_hidden_states)
    select = select or partial(select_instances, strategy=args.data_selection, ratio=args.selection_ratio)
    plan = plan_batch(args, logits, batch, select, ALIGN)
    answers = {role: fake_answer(q, role, i) for i, (role, q) in enumerate(plan.queries.items())}
    loss, parts = distillation_loss(args, student, logits, hidden, batch, plan, answers, ALIGN)
    return student, batch, logits, hidden, plan, answers, loss, parts


def test_hard_sends_each_half_only_to_its_teacher_trimmed_to_its_longest_row() -> None:
    args = kd_args(teacher_selection="hard", data_selection="entropy", selection_ratio=0.75)
    _, batch, logits, _, plan, _, _, _ = run(args)
    assert len(plan.selected) == 6  # int(8 · 0.75)
    small, large = (plan.selected[plan.routes[r]] for r in ("small", "large"))
    assert len(small) == 3 and len(large) == 3
    assert set(small.tolist()).isdisjoint(large.tolist())
    for role, rows in (("small", small), ("large", large)):
        query = plan.queries[role]
        width = max(LENGTHS[i] for i in rows.tolist())
        assert query.input_ids.shape == (3, width)
        assert torch.equal(query.input_ids, batch["input_ids"][rows, :width])
        assert query.want_logits and query.cls_layers == () and query.token_layers == ()  # kd: logits only
    assert plan.rows_sent == {"small": 3, "large": 3}


@pytest.mark.parametrize("selection", ["soft", "soft-batch", "ensemble"])
def test_two_teacher_methods_ask_both_about_every_selected_row(selection: str) -> None:
    args = kd_args(teacher_selection=selection, data_selection="lc", selection_ratio=0.5)
    plan = run(args)[4]
    assert plan.rows_sent == {"small": 4, "large": 4}
    assert torch.equal(plan.queries["small"].input_ids, plan.queries["large"].input_ids)


@pytest.mark.parametrize(
    ("supervision", "features", "cls_small", "cls_large", "tokens_large"),
    [
        ("kd", "cls", (), (), ()),
        ("pkd", "cls", (0, 1, 2), (0, 2, 4), ()),
        ("uncertainty", "all-tokens", (), (), (0, 2, 4)),
    ],
)
def test_queries_ask_only_for_what_the_loss_needs(
    supervision, features, cls_small, cls_large, tokens_large
) -> None:
    args = kd_args(teacher_selection="soft", supervision=supervision, pt_features=features)
    plan = run(args)[4]
    assert plan.queries["small"].cls_layers == cls_small
    assert plan.queries["large"].cls_layers == cls_large
    assert plan.queries["large"].token_layers == tokens_large


def test_nothing_selected_means_no_request_and_plain_cross_entropy() -> None:
    args = kd_args(teacher_selection="hard", data_selection="entropy", selection_ratio=0.1, supervision="pkd")
    student, batch, logits, _, plan, _, loss, parts = run(args)
    assert len(plan.selected) == 0 and plan.queries == {}  # int(8 · 0.1) = 0
    assert torch.equal(loss, F.cross_entropy(logits, batch["labels"]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.model.parameters() if p.grad is not None)
    assert parts["kd"] == 0.0 and parts["pt"] == 0.0


def test_single_teacher_kd_is_cross_entropy_plus_kd_on_the_selected_rows() -> None:
    args = kd_args(
        teacher_selection="large", data_selection="margin", selection_ratio=0.5, kd_loss="kl", temperature=2.0
    )
    args = replace(args, ce_alpha=0.3, kd_alpha=0.7, lambda_kl=2.0)
    _, batch, logits, _, plan, answers, loss, _ = run(args)
    assert plan.selected.tolist() == select_instances(logits, "margin", 0.5).tolist()
    kd = kd_loss(logits[plan.selected], answers["large"].logits, "kl", 2.0).mean()
    expected = 0.3 * F.cross_entropy(logits, batch["labels"]) + 0.7 * 2.0 * kd
    assert torch.allclose(loss, expected)


def test_ensemble_distils_the_mean_of_both_teachers_logits() -> None:
    args = kd_args(teacher_selection="ensemble", kd_loss="mse")
    _, batch, logits, _, plan, answers, loss, _ = run(args)
    target = (answers["small"].logits + answers["large"].logits) / 2
    expected = F.cross_entropy(logits, batch["labels"]) + kd_loss(logits[plan.selected], target, "mse").mean()
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("selection", ["soft", "soft-batch"])
def test_soft_weighs_each_teacher_by_the_students_uncertainty(selection: str) -> None:
    args = kd_args(teacher_selection=selection)
    _, batch, logits, _, plan, answers, loss, _ = run(args)
    w_small, w_large = soft_teacher_weights(logits, per_instance=selection == "soft")
    kd = w_small * kd_loss(logits, answers["small"].logits) + w_large * kd_loss(
        logits, answers["large"].logits
    )
    assert torch.allclose(loss, F.cross_entropy(logits, batch["labels"]) + kd.mean())
    if selection == "soft-batch":
        assert torch.allclose(w_small, w_small.mean().expand_as(w_small))


def test_uncertainty_supervision_mixes_kl_and_patient_loss_per_row() -> None:
    args = kd_args(teacher_selection="small", supervision="uncertainty", lambda_kl=0.5, lambda_pt=3.0)
    student, batch, logits, hidden, plan, answers, loss, _ = run(args)
    features = torch.stack([h[:, 0] for h in hidden], dim=1)  # [B, 3, 32]; small teacher is as wide
    pt = patient_loss(features, ALIGN["small"].gather(answers["small"].hidden_cls))
    w_kl, w_pt = supervision_weights(logits, 0.5, 3.0)
    term = (w_kl * kd_loss(logits, answers["small"].logits) + w_pt * pt).mean()
    assert torch.allclose(loss, F.cross_entropy(logits, batch["labels"]) + term)


def test_patient_loss_trains_the_projection_and_masks_padding() -> None:
    args = kd_args(teacher_selection="large", supervision="pkd", pt_features="all-tokens", lambda_kl=0.0)
    student, batch, logits, hidden, plan, answers, loss, _ = run(args)
    loss.backward()
    assert student.projections["large"].weight.grad.abs().sum() > 0
    # changing a teacher's padding positions must not change the loss
    padded = answers["large"].hidden_states.clone()
    mask = plan.queries["large"].attention_mask.bool()
    padded[~mask[:, None, :, None].expand_as(padded)] = 123.0
    answers_padded = {"large": TeacherAnswer(answers["large"].logits, None, padded, 0, 0, 0)}
    again, _ = distillation_loss(args, student, logits, hidden, batch, plan, answers_padded, ALIGN)
    assert torch.allclose(loss, again)


class FakeClient:
    """A teacher that answers after ``delay_s``; fails its first ``failures`` calls."""

    def __init__(self, role: str, delay_s: float = 0.0, failures: int = 0):
        self.role, self.delay_s, self.failures = role, delay_s, failures
        self.calls = self.starts = 0
        self.info = TeacherInfo(role, 2, 32, 2, ("a", "b"), 100, 64)

    async def start(self, ready_timeout_s: float) -> TeacherInfo:
        self.starts += 1
        return self.info

    async def infer(self, query: TeacherQuery) -> TeacherAnswer:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.calls <= self.failures:
            raise ConnectionError(f"{self.role} is down")
        return fake_answer(query, self.role, 0)

    async def aclose(self) -> None:
        pass


def queries() -> dict[str, TeacherQuery]:
    batch = make_batch()
    return {r: TeacherQuery(batch["input_ids"], batch["attention_mask"]) for r in ("small", "large")}


def test_both_teachers_are_asked_concurrently() -> None:
    clients = {"small": FakeClient("small", 0.3), "large": FakeClient("large", 0.3)}
    started = time.perf_counter()
    answers = asyncio.run(ask_teachers(clients, queries(), ready_timeout_s=1.0))
    assert time.perf_counter() - started < 0.5  # not 0.6: in flight together
    assert set(answers) == {"small", "large"}


def test_a_teacher_back_after_a_restart_is_asked_again() -> None:
    clients = {"small": FakeClient("small", failures=1), "large": FakeClient("large")}
    answers = asyncio.run(ask_teachers(clients, queries(), ready_timeout_s=1.0))
    assert answers["small"].logits.shape == (8, 2)
    assert clients["small"].starts == 1 and clients["small"].calls == 2


def test_a_teacher_that_stays_down_names_itself() -> None:
    clients = {"small": FakeClient("small"), "large": FakeClient("large", failures=math.inf)}
    with pytest.raises(TeacherCallError, match="teacher 'large' failed: ConnectionError: large is down"):
        asyncio.run(ask_teachers(clients, queries(), ready_timeout_s=1.0))


def test_a_teacher_that_comes_back_as_another_model_is_not_trusted() -> None:
    swapped = FakeClient("small", failures=1)

    async def start(ready_timeout_s: float) -> TeacherInfo:
        swapped.info = TeacherInfo("small", 12, 768, 2, ("a", "b"), 100, 64)  # restarted with other weights
        return swapped.info

    swapped.start = start
    with pytest.raises(TeacherCallError, match="came back as a different model"):
        asyncio.run(ask_teachers({"small": swapped}, {"small": queries()["small"]}, ready_timeout_s=1.0))


def test_a_refused_request_is_not_asked_again() -> None:
    """A 4xx (e.g. more rows than the service's max_batch_size) would be refused again: fail at once."""
    refusing = FakeClient("large")

    async def infer(query: TeacherQuery) -> TeacherAnswer:
        refusing.calls += 1
        raise TeacherRequestError("http://t: 422 input_ids: 64 rows exceed max_batch_size 32", status=422)

    refusing.infer = infer
    with pytest.raises(TeacherCallError, match="teacher 'large' failed: TeacherRequestError: .*422"):
        asyncio.run(ask_teachers({"large": refusing}, {"large": queries()["large"]}, ready_timeout_s=1.0))
    assert refusing.calls == 1 and refusing.starts == 0
