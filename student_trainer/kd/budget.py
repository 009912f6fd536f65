"""A teacher budget: the teacher FLOPs a whole run may spend, paced over it, bought row by row.

``--teacher_budget`` is an absolute figure (``500GF``, ``2TF``, ``1.5e12``) or a fraction of what
vanilla KD would spend on the same run (``10%``: of the ledger's ``teacher_flops_vanilla_unpadded``,
every row through every teacher the method uses at its real length). The spend is what the ledger
calls ``teacher_flops_requested``: the rows sent, at their real lengths, on the teacher each goes
to — so the service's cache or padding never makes a budget look kept when it was not.

For teachers behind other servers, whose FLOPs are unknown, the budget is a number of **calls**
(``5000calls``: rows sent, each teacher a row goes to counting one; the ledger's
``teacher_rows``) or of **tokens** (``2Mtok``: the rows' lengths in each teacher's tokens; for a
teacher sent text, priced before it answers as the student's length times the run's observed
ratio of teacher to student tokens, and reported as the tokens the teachers counted), paced and
bought the same way.

**Pacing.** After step ``t`` of ``T`` the spend so far may not exceed ``budget × t/T``; with a
fraction ``f`` the progress is measured in vanilla FLOPs, so the bound is ``f × (vanilla FLOPs of
the batches seen so far)`` (the whole run's vanilla total is not known before it ends, and this is
the same line through the same end point). A batch's allowance is that bound minus the spend so
far, so what one batch leaves unused carries over to the next; the bound at the end is the budget,
so the run never exceeds it. Integer (and exact rational) arithmetic: nothing rounds up.

**Choice within a batch.** Rows go in order of value per teacher FLOP (their uncertainty over the
cost of the row at its real length on the teacher it would go to; ``random``: a random order,
whatever the cost, so that it is the ratio's baseline at equal spend), the most valuable first; a
row that does not fit the remaining allowance is skipped, a cheaper one may still fit. With equal
costs this is the ratio's choice: the same rows in the same order.

Under ``torchrun`` every rank paces its own share (``budget / world_size``, or the fraction of its
own vanilla FLOPs): the ranks' sums keep the whole run's bound. The pacer's two counters are part
of each rank's checkpoint state, so a resumed run buys exactly the rows the uninterrupted one would.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from shared.uncertainty import check_logits, uncertainty_scores

UNITS = {"": 1, "F": 1, "KF": 10**3, "MF": 10**6, "GF": 10**9, "TF": 10**12, "PF": 10**15, "EF": 10**18}
PREFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}  # of calls and tokens: 5000calls, 2Mtok
_SPEC = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+)\s*(%|[KMGTPE]?F|[KMG]?calls?|[KMG]?tok(?:ens?)?)?\s*$",
    re.I,
)
# what ``margin`` scores cannot go below (``-margin`` >= -1): values are shifted to start at zero
_SCORE_FLOOR = {"entropy": 0.0, "lc": 0.0, "margin": -1.0}


@dataclass(frozen=True)
class TeacherBudget:
    """A parsed ``--teacher_budget``: an absolute amount (``flops``, in ``unit``: FLOPs, calls or
    tokens) or a ``fraction`` of vanilla KD's FLOPs."""

    flops: int | None = None
    fraction: Fraction | None = None
    unit: str = "flops"  # "calls": rows sent, per teacher; "tokens": the teachers' tokens

    @classmethod
    def parse(cls, spec: str) -> TeacherBudget:
        """``500GF``, ``2TF``, ``1e12`` (FLOPs), ``10%``, ``5000calls``, ``2Mtok``; a ``ValueError``
        names what is wrong."""
        match = _SPEC.match(str(spec))
        if not match:
            raise ValueError(
                f"--teacher_budget takes FLOPs (500GF, 2TF, 1e12; units {', '.join(u for u in UNITS if u)}), "
                f"a percentage of vanilla KD (10%), calls (5000calls) or tokens (2Mtok), got {spec!r}"
            )
        number, unit = Fraction(match.group(1)), (match.group(2) or "").upper()
        if unit == "%":
            if not 0 < number <= 100:
                raise ValueError(f"--teacher_budget percentage must be in (0, 100], got {spec!r}")
            return cls(fraction=number / 100)
        kind = "calls" if "CALL" in unit else "tokens" if "TOK" in unit else "flops"
        scale = UNITS[unit] if kind == "flops" else PREFIXES[unit[:1] if unit[:1] in "KMG" else ""]
        amount = math.floor(number * scale)
        if amount < 1:
            raise ValueError(f"--teacher_budget must be at least one {kind.rstrip('s')}, got {spec!r}")
        return cls(flops=amount, unit=kind)

    def bound(self, steps_done: int, total_steps: int, vanilla: int, world_size: int = 1) -> int:
        """The most a rank (of ``world_size``) may have spent after ``steps_done`` of ``total_steps``
        steps whose vanilla FLOPs were ``vanilla``; the whole run's bound with ``world_size = 1``."""
        if self.fraction is not None:
            return math.floor(self.fraction * vanilla)
        assert self.flops is not None
        return self.flops // world_size * min(steps_done, total_steps) // total_steps

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{float(self.fraction * 100):g}% of vanilla KD"
        if self.unit != "flops":
            return f"{self.flops:,} {self.unit}"
        return f"{self.flops / 1e9:,.2f} GFLOPs"


@dataclass(frozen=True)
class BatchCosts:
    """What a batch's rows would cost: ``routed[i]`` if row ``i`` is chosen (on the teacher(s) it
    would go to), and ``vanilla``: every row through every teacher, vanilla KD's unpadded bill."""

    routed: torch.Tensor
    vanilla: int


class BudgetPacer:
    """One rank's pacing of a :class:`TeacherBudget` and its purchases (see the module docstring)."""

    def __init__(self, budget: TeacherBudget, total_steps: int, world_size: int = 1) -> None:
        self.budget, self.total_steps, self.world_size = budget, total_steps, world_size
        self.steps = 0  # batches this rank has bought rows for
        self.spent = 0  # teacher FLOPs requested so far by this rank
        self.vanilla = 0  # vanilla KD's unpadded FLOPs of this rank's batches so far

    def allowance(self, batch_vanilla: int) -> int:
        """What the next batch may spend: the bound after it minus the spend so far."""
        bound = self.budget.bound(
            self.steps + 1, self.total_steps, self.vanilla + batch_vanilla, self.world_size
        )
        return max(0, bound - self.spent)

    def select(
        self, logits: torch.Tensor, costs: BatchCosts, strategy: str, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The rows this batch buys, most valuable per FLOP first; the spend is recorded."""
        allowance = self.allowance(costs.vanilla)
        chosen, spent = buy_rows(
            buying_order(logits, costs.routed, strategy, generator), costs.routed, allowance
        )
        self.steps, self.spent, self.vanilla = (
            self.steps + 1,
            self.spent + spent,
            self.vanilla + costs.vanilla,
        )
        return torch.tensor(chosen, dtype=torch.long, device=logits.device)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "spent": self.spent, "vanilla": self.vanilla}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps, self.spent, self.vanilla = (int(state[k]) for k in ("steps", "spent", "vanilla"))


def buying_order(
    logits: torch.Tensor, costs: torch.Tensor, strategy: str, generator: torch.Generator | None = None
) -> list[int]:
    """The batch's rows, the most worth a teacher FLOP first: uncertainty (shifted to start at 0)
    over the row's cost, ties by lower index (a stable sort, as the ratio's top-k); ``random``: a
    random order, whatever the cost (the ratio's baseline, at equal spend)."""
    check_logits(logits)
    if strategy == "random":
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randperm(logits.shape[0], generator=generator, device=device).tolist()
    if strategy not in _SCORE_FLOOR:
        raise ValueError(f"a teacher budget needs a selection strategy in {('random', *_SCORE_FLOOR)}")
    values = uncertainty_scores(logits.detach().double(), strategy).cpu() - _SCORE_FLOOR[strategy]
    per_flop = values / costs.cpu().clamp(min=1).double()
    return torch.sort(per_flop, descending=True, stable=True).indices.tolist()


def buy_rows(order: list[int], costs: torch.Tensor, allowance: int) -> tuple[list[int], int]:
    """The rows of ``order`` bought within ``allowance``, in that order, and what they cost; a row
    that does not fit is skipped, a cheaper one after it may still fit."""
    chosen, spent = [], 0
    for row, cost in zip(order, costs.cpu()[order].tolist(), strict=True):
        if cost <= allowance - spent:
            chosen.append(row)
            spent += cost
    return chosen, spent


def budget_counts(budget: TeacherBudget, steps_done: int, total_steps: int, vanilla: int, spent: int) -> dict:
    """The whole run's bound so far (the budget itself once every step ran) beside its spend, in
    the budget's unit: what ``metrics.jsonl`` logs per step and ``results.json`` keeps at the end."""
    bound = budget.bound(steps_done, total_steps, vanilla)
    return {
        f"teacher_budget_{budget.unit}": bound,
        f"teacher_budget_spent_{budget.unit}": spent,
        "teacher_budget_used_fraction": spent / bound if bound else None,
    }


def unit_costs(
    unit: str, flops: Mapping[str, list[int]], lengths: Mapping[str, list[int]]
) -> dict[str, list[int]]:
    """What each row costs each teacher in a budget's unit: its FLOPs, one call, or its tokens
    (``lengths``: each teacher's length of each row)."""
    if unit == "calls":
        return {role: [1] * len(costs) for role, costs in flops.items()}
    return {role: list(lengths[role]) for role in flops} if unit == "tokens" else dict(flops)
