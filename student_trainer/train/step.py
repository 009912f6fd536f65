"""One batch of dynamic KD after the student's forward pass, in the order the trainer calls its parts.

1. :func:`ask_teachers_after` — the student's own (detached) uncertainty picks rows and teachers
   (:func:`~student_trainer.kd.plan.plan_batch`); every teacher's query in flight at once. A teacher
   that stays down is returned as ``failure`` so that the trainer can checkpoint before it stops.
2. :func:`step_counts` — this batch's FLOPs ledger entries, summed over the processes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.teacher_api import TeacherAnswer
from student_trainer.kd import ledger as flops
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.budget import BatchCosts, unit_costs
from student_trainer.kd.config import KDConfig
from student_trainer.kd.ledger import FlopsLedger
from student_trainer.kd.plan import RowTexts, TeacherPlan, plan_batch, routed_costs
from student_trainer.teachers.client import TeacherCallError, ask_teachers, in_data_label_order
from student_trainer.train.setup import RowSelector, Teachers


class KDContext(Protocol):
    """What one batch of dynamic KD reads (:class:`~student_trainer.train.trainer.DynamicKDTrainer`)."""

    kd: KDConfig
    selector: RowSelector
    alignments: dict[str, LayerAlignment]
    ledger: FlopsLedger
    text_roles: frozenset[str]

    def row_texts(self, rows: list[int]) -> tuple[list[str], list[str] | None]: ...


@dataclass
class TeacherRound:
    """The student's forward pass of one batch and what the teachers answered about it."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    plan: TeacherPlan
    answers: dict[str, TeacherAnswer]
    failure: TeacherCallError | None
    seconds: float  # waiting for the teachers


def batch_costs(
    ctx: KDContext, teachers: Teachers, logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> BatchCosts:
    """What each row would cost a teacher budget (on its routed teacher(s)), in the budget's unit,
    and vanilla KD's bill."""
    assert ctx.kd.budget is not None
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    own = {  # each teacher's tokens: a teacher sent text at the run's observed ratio so far
        role: flops.scaled_lengths(lengths, ctx.ledger.token_ratio(role, {}))
        if role in ctx.text_roles
        else lengths
        for role in teachers.infos
    }
    costs = unit_costs(ctx.kd.budget.unit, flops.row_costs(teachers.infos, lengths), own)
    vanilla = sum(sum(per_row) for per_row in costs.values())
    return BatchCosts(routed_costs(ctx.kd, logits, costs), vanilla)


def ask_teachers_after(
    ctx: KDContext,
    teachers: Teachers,
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None,
) -> TeacherRound:
    """Given the student's forward pass: choose rows and teachers from its uncertainty; ask them."""
    texts: dict[str, RowTexts] = {role: ctx.row_texts for role in ctx.text_roles}
    costs = batch_costs(ctx, teachers, logits, batch) if ctx.selector.pacer else None
    select = functools.partial(ctx.selector.select, costs=costs)
    plan = plan_batch(ctx.kd, logits, batch, select, ctx.alignments, texts)
    failure: TeacherCallError | None = None
    asked = time.perf_counter()
    try:
        answers = teachers.loop.run_until_complete(
            ask_teachers(teachers.clients, plan.queries, teachers.ready_timeout_s)
        )
    except TeacherCallError as err:
        answers, failure = {}, err
    answers = {role: in_data_label_order(a, teachers.label_orders[role]) for role, a in answers.items()}
    return TeacherRound(logits, hidden_states, plan, answers, failure, time.perf_counter() - asked)


def step_counts(
    ctx: KDContext,
    student_config: object,
    teachers: Teachers,
    batch: dict[str, torch.Tensor],
    asked: TeacherRound,
) -> dict[str, int]:
    """This step's ledger entries (teachers spent / requested / vanilla, student), summed over ranks."""
    batch_size, seq_len = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    plan, answers = asked.plan, asked.answers
    rows = {role: plan.sent_rows(role).tolist() for role in plan.queries}
    student_sent = {role: [lengths[i] for i in sent] for role, sent in rows.items()}
    teacher_sent = {  # in the teacher's own tokens (measured by it when it was sent text)
        role: flops.sent_lengths(query, answers[role], student_sent[role])
        for role, query in plan.queries.items()
    }
    spent = flops.teacher_counts(answers, plan.rows_sent, {role: sum(n) for role, n in student_sent.items()})
    text_lengths = {  # every row in a text teacher's tokens: measured if sent, else estimated
        role: flops.text_batch_lengths(
            lengths, ctx.ledger.token_ratio(role, spent), rows.get(role, []), teacher_sent.get(role, [])
        )
        for role in ctx.text_roles
    }
    return flops.all_reduce_counts(
        {
            **spent,
            **flops.requested_counts(teachers.infos, teacher_sent),
            **flops.vanilla_counts(teachers.infos, lengths, seq_len, text_lengths),
            **flops.student_counts(student_config, batch_size, seq_len),
            "selected_instances": len(plan.selected),
        },
        ctx.ledger.keys,
    )
