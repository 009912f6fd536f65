"""Which rows of a batch the teachers see and what each teacher is asked (a :class:`TeacherPlan`).

From the student's (detached) logits of its training forward pass: the ``int(B·r)`` selected
rows (or, with a teacher budget, those its allowance buys), then which teacher answers which of
them (``hard`` sends each of ``k`` equal groups only to its own teacher of the ladder; every other
method asks its teacher(s) about every selected row), and one
:class:`TeacherQuery` per teacher asking only for what the loss needs (logits; hidden states of
the aligned layers only for ``pkd``/``uncertainty``): token ids for a teacher that shares the
student's vocabulary, the rows' raw text for one with its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.teacher_api import TeacherQuery, TextQuery, query_rows
from student_trainer.kd.alignment import LayerAlignment
from student_trainer.kd.config import KDConfig
from student_trainer.kd.selection import hard_split

# dataset rows -> their raw (text, text_pair), for teachers that tokenize with their own vocabulary
RowTexts = Callable[[list[int]], tuple[list[str], list[str] | None]]


@dataclass
class TeacherPlan:
    """Who is asked about what, for one batch."""

    selected: torch.Tensor  # batch rows that get teacher supervision, most uncertain first
    routes: dict[str, torch.Tensor]  # role -> positions in ``selected`` that this teacher answers
    queries: dict[str, TeacherQuery | TextQuery]  # role -> the request (only teachers with rows to answer)

    @property
    def rows_sent(self) -> dict[str, int]:
        return {role: query_rows(query) for role, query in self.queries.items()}

    def sent_rows(self, role: str) -> torch.Tensor:
        """The batch rows sent to ``role``, in the order of its query."""
        return self.selected[self.routes[role]]


def teacher_query(
    batch: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    config: KDConfig,
    alignment: LayerAlignment,
    texts: RowTexts | None = None,
) -> TeacherQuery | TextQuery:
    """The chosen rows, trimmed to their own longest sequence, asking only for what the loss uses.

    With ``texts`` (a teacher with its own vocabulary) the rows go as raw text instead of ids;
    all-token features cannot line up across tokenizers and are refused before training.
    """
    layers = alignment.teacher_layers if config.uses_hidden_states else ()
    cls_layers = layers if config.pt_features == "cls" else ()
    token_layers = layers if config.pt_features == "all-tokens" else ()
    if texts is not None:
        text, text_pair = texts(batch["index"][rows].tolist())
        return TextQuery(text, text_pair, cls_layers=cls_layers, token_layers=token_layers)
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(dim=1).max())
    return TeacherQuery(
        input_ids=batch["input_ids"][rows, :width].cpu(),
        attention_mask=mask[:, :width].cpu(),
        token_type_ids=batch["token_type_ids"][rows, :width].cpu(),
        want_logits=True,
        cls_layers=cls_layers,
        token_layers=token_layers,
    )


def batch_teams(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[B]``: the ladder position (0 = smallest) of each row's teacher under a budgeted ``hard``.

    With a budget, a row's cost must be known before the rows are chosen, so ``hard`` routes by
    the row's group in the whole batch (:func:`hard_split` of every row), not in the selection.
    """
    teams = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for position, rows in enumerate(hard_split(logits, k)):
        teams[rows] = position
    return teams


def routed_costs(config: KDConfig, logits: torch.Tensor, costs: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """``[B]`` int64: what each row costs if chosen — on the teacher ``hard`` routes it to, else
    on every teacher the method asks (``costs``: each teacher's FLOPs per row at its real length)."""
    roles = config.teacher_roles
    table = torch.tensor([list(costs[role]) for role in roles], dtype=torch.int64, device=logits.device)
    if config.teacher_selection == "hard":
        return table.gather(0, batch_teams(logits.detach(), len(roles))[None]).squeeze(0)
    return table.sum(dim=0)


def _hard_routes(config: KDConfig, logits: torch.Tensor, selected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Positions in ``selected`` per teacher: ``k`` equal groups of the selection by uncertainty;
    with a budget, each row's group in the batch (see :func:`batch_teams`)."""
    roles = config.teacher_roles
    if config.teacher_budget is None:
        return dict(zip(roles, hard_split(logits[selected], len(roles)), strict=True))
    teams = batch_teams(logits, len(roles))[selected]
    return {role: torch.nonzero(teams == j).flatten() for j, role in enumerate(roles)}


def plan_batch(
    config: KDConfig,
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    select: Callable[[torch.Tensor], torch.Tensor],
    alignments: Mapping[str, LayerAlignment],
    texts: Mapping[str, RowTexts] | None = None,
) -> TeacherPlan:
    """Select rows by the student's uncertainty and route them (see the module docstring);
    ``texts`` names the teachers that get raw text (``batch["index"]`` = the rows' dataset indices)."""
    roles = config.teacher_roles
    logits = logits.detach()
    if not roles:
        return TeacherPlan(torch.zeros(0, dtype=torch.long, device=logits.device), {}, {})
    selected = select(logits)
    if config.teacher_selection == "hard":
        routes = _hard_routes(config, logits, selected)
    else:
        routes = {role: torch.arange(len(selected), device=logits.device) for role in roles}
    texts = texts or {}
    queries = {
        role: teacher_query(batch, selected[positions], config, alignments[role], texts.get(role))
        for role, positions in routes.items()
        if len(positions)
    }
    return TeacherPlan(selected, routes, queries)
