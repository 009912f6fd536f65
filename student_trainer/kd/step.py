"""One batch of dynamic KD: which rows the teachers see, what they are asked, how the losses combine.

The decisions and the losses are the pure functions of :mod:`student_trainer.kd.selection` and
:mod:`student_trainer.kd.losses`; this module applies them to a batch:

1. :func:`plan_batch` — from the student's (detached) logits of its training forward pass:
   the ``int(B·r)`` selected rows, then which teacher answers which of them (``hard`` sends
   each half only to its own teacher; every other method asks its teacher(s) about every
   selected row), and one :class:`TeacherQuery` per teacher asking only for what the loss
   needs (logits; hidden states of the aligned layers only for ``pkd``/``uncertainty``).
2. :func:`ask_teachers` — every teacher's query in flight at once on the caller's event loop;
   a teacher that is down is waited for (bounded) and asked again before the step gives up.
3. :func:`distillation_loss` —
   ``L = ce_alpha·CE + kd_alpha·mean_{i∈S}(w_kl,i·KD_i + w_pt,i·PT_i)``: CE over every row,
   the distillation term over the selected rows ``S`` only (zero when ``S`` is empty), with
   ``(w_kl, w_pt) = (λ_KL, 0)`` for ``kd``, ``(λ_KL, λ_PT)`` for ``pkd`` and
   ``(λ_KL·(1-u/U), λ_PT·u/U)`` for ``uncertainty``. Per row, ``KD_i`` and ``PT_i`` combine the
   teachers: ``small``/``large``/``hard`` — the one teacher that answered the row; ``soft`` —
   ``u/U·loss_small + (1-u/U)·loss_large`` (batch mean of ``u/U`` for ``soft-batch``);
   ``ensemble`` — KD against the mean of both teachers' logits, PT averaged over both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from shared.teacher_api import TeacherAnswer, TeacherQuery
from student_trainer.args.distill import DistillArguments
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.losses import kd_loss, patient_loss
from student_trainer.kd.selection import hard_split, soft_teacher_weights, supervision_weights
from student_trainer.teachers.client import TeacherClient
from student_trainer.teachers.http import TeacherRequestError
from student_trainer.train.student import DistillStudent


@dataclass
class TeacherPlan:
    """Who is asked about what, for one batch."""

    selected: torch.Tensor  # batch rows that get teacher supervision, most uncertain first
    routes: dict[str, torch.Tensor]  # role -> positions in ``selected`` that this teacher answers
    queries: dict[str, TeacherQuery]  # role -> the request (only teachers with rows to answer)

    @property
    def rows_sent(self) -> dict[str, int]:
        return {role: int(query.input_ids.shape[0]) for role, query in self.queries.items()}


def teacher_query(
    batch: Mapping[str, torch.Tensor], rows: torch.Tensor, args: DistillArguments, alignment: LayerAlignment
) -> TeacherQuery:
    """The chosen rows, trimmed to their own longest sequence, asking only for what the loss uses."""
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(dim=1).max())
    layers = alignment.teacher_layers if args.uses_hidden_states else ()
    return TeacherQuery(
        input_ids=batch["input_ids"][rows, :width].cpu(),
        attention_mask=mask[:, :width].cpu(),
        token_type_ids=batch["token_type_ids"][rows, :width].cpu(),
        want_logits=True,
        cls_layers=layers if args.pt_features == "cls" else (),
        token_layers=layers if args.pt_features == "all-tokens" else (),
    )


def plan_batch(
    args: DistillArguments,
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    select: Callable[[torch.Tensor], torch.Tensor],
    alignments: Mapping[str, LayerAlignment],
) -> TeacherPlan:
    """Select rows by the student's uncertainty and route them (see the module docstring)."""
    roles = args.teacher_roles
    logits = logits.detach()
    if not roles:
        return TeacherPlan(torch.zeros(0, dtype=torch.long, device=logits.device), {}, {})
    selected = select(logits)
    if args.teacher_selection == "hard":
        small, large = hard_split(logits[selected])
        routes = {"small": small, "large": large}
    else:
        routes = {role: torch.arange(len(selected), device=logits.device) for role in roles}
    queries = {
        role: teacher_query(batch, selected[positions], args, alignments[role])
        for role, positions in routes.items()
        if len(positions)
    }
    return TeacherPlan(selected, routes, queries)


class TeacherCallError(Exception):
    """A teacher did not answer (after its client's own retries); names the teacher."""

    def __init__(self, role: str, cause: BaseException):
        super().__init__(f"teacher {role!r} failed: {type(cause).__name__}: {cause}")
        self.role = role


async def ask_teachers(
    clients: Mapping[str, TeacherClient], queries: Mapping[str, TeacherQuery], ready_timeout_s: float
) -> dict[str, TeacherAnswer]:
    """Send every query at once; if one teacher fails for good, cancel the others and raise.

    A client gives up after its own retries; the teacher may still be restarting, so wait
    (at most ``ready_timeout_s``) for it to report ready again — as the same model — and ask
    once more. A request the teacher refused (4xx) is not asked again.
    """

    async def ask(role: str) -> TeacherAnswer:
        client = clients[role]
        try:
            return await client.infer(queries[role])
        except TeacherRequestError as refused:  # a 4xx: the same request would be refused again
            raise TeacherCallError(role, refused) from refused
        except Exception as first:
            known = client.info
            try:
                info = await client.start(ready_timeout_s)
                if known is not None and info != known:
                    raise RuntimeError(f"came back as a different model: {info} (was {known})")
                return await client.infer(queries[role])
            except Exception as err:
                raise TeacherCallError(role, err) from first

    tasks = {role: asyncio.ensure_future(ask(role)) for role in queries}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        raise
    return {role: task.result() for role, task in tasks.items()}


def in_data_label_order(answer: TeacherAnswer, order: list[int] | None) -> TeacherAnswer:
    """The answer with its logit columns in the data's label order (see ``teacher_label_order``)."""
    if order is None or answer.logits is None:
        return answer
    return replace(answer, logits=answer.logits[:, order])


def _teacher_weights(args: DistillArguments, selected_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much each teacher's loss counts for each selected row (``hard`` routes, it does not weigh)."""
    n = selected_logits.shape[0]
    ones = torch.ones(n, device=selected_logits.device)
    if args.teacher_selection in ("soft", "soft-batch"):
        w_small, w_large = soft_teacher_weights(
            selected_logits, per_instance=args.teacher_selection == "soft"
        )
        return {"small": w_small, "large": w_large}
    if args.teacher_selection == "ensemble":
        return {"small": ones / 2, "large": ones / 2}
    return {role: ones for role in args.teacher_roles}


def _student_features(
    hidden_states: tuple[torch.Tensor, ...], rows: torch.Tensor, kind: str, width: int
) -> torch.Tensor:
    """The student's ``m + 1`` states for ``rows``: ``[r, m+1, H]`` ([CLS]) or ``[r, m+1, width, H]``."""
    if kind == "cls":
        return torch.stack([h[rows, 0] for h in hidden_states], dim=1)
    return torch.stack([h[rows, :width] for h in hidden_states], dim=1)


def distillation_loss(
    args: DistillArguments,
    student: DistillStudent,
    logits: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None,
    batch: Mapping[str, torch.Tensor],
    plan: TeacherPlan,
    answers: Mapping[str, TeacherAnswer],
    alignments: Mapping[str, LayerAlignment],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (for logging); see the module docstring."""
    ce = F.cross_entropy(logits, batch["labels"])
    loss = args.ce_alpha * ce
    parts = {"ce": ce.item(), "kd": 0.0, "pt": 0.0}
    n = len(plan.selected)
    if n == 0:
        return loss, parts

    device = logits.device
    selected_logits = logits[plan.selected]
    weights = _teacher_weights(args, selected_logits)
    kd_per_row = torch.zeros(n, device=device)
    pt_per_row = torch.zeros(n, device=device)
    if args.teacher_selection == "ensemble":
        mean_logits = torch.stack([answers[r].logits.to(device) for r in ("small", "large")]).mean(dim=0)
        kd_per_row = kd_loss(selected_logits, mean_logits, args.kd_loss, args.temperature)
    for role, answer in answers.items():
        positions = plan.routes[role]
        weight = weights[role][positions]
        if args.teacher_selection != "ensemble":
            kd = kd_loss(selected_logits[positions], answer.logits.to(device), args.kd_loss, args.temperature)
            kd_per_row = kd_per_row.index_add(0, positions, weight * kd)
        if args.uses_hidden_states:
            rows = plan.selected[positions]
            teacher_states = answer.hidden_cls if args.pt_features == "cls" else answer.hidden_states
            width = plan.queries[role].input_ids.shape[1]
            student_states = student.projections[role](
                _student_features(hidden_states, rows, args.pt_features, width)
            )
            mask = batch["attention_mask"][rows, :width] if args.pt_features == "all-tokens" else None
            pt = patient_loss(student_states, alignments[role].gather(teacher_states.to(device)), mask)
            pt_per_row = pt_per_row.index_add(0, positions, weight * pt)

    if args.supervision == "uncertainty":
        w_kl, w_pt = supervision_weights(selected_logits, args.lambda_kl, args.lambda_pt)
    else:
        w_kl, w_pt = args.lambda_kl, (args.lambda_pt if args.supervision == "pkd" else 0.0)
    distill = (w_kl * kd_per_row + w_pt * pt_per_row).mean()
    parts.update(kd=kd_per_row.mean().item(), pt=pt_per_row.mean().item())
    return loss + args.kd_alpha * distill, parts
