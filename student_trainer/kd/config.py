"""What the distillation maths reads: a small config object, not the command line (TextBrewer's
``DistillationConfig``). ``DistillArguments.kd`` builds it; tests of the maths build it directly.

The allowed values of each knob live here (and in :mod:`~student_trainer.kd.selection` and
:mod:`~student_trainer.kd.losses` for the strategies and loss kinds); the command line takes its
``choices`` from these tuples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from student_trainer.kd.budget import TeacherBudget
from student_trainer.kd.losses import KD_LOSS_KINDS
from student_trainer.kd.selection import SELECTION_STRATEGIES

TEACHER_ROLES = ("small", "large")  # the paper's two teachers; any other names make a ladder
LADDER_METHODS = ("ensemble", "hard", "soft", "soft-batch")  # methods that ask every teacher
TEACHER_SELECTIONS = (*TEACHER_ROLES, *LADDER_METHODS)
TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a teacher's name (not a LADDER_METHODS one)
SUPERVISIONS = ("kd", "pkd", "uncertainty")
PT_FEATURES = ("cls", "all-tokens")


@dataclass(frozen=True)
class KDConfig:
    """The three dynamic-KD decisions and the loss weights (see :mod:`student_trainer.kd.objective`).

    ``teacher_selection`` None means no teacher at all (the cross-entropy-only baseline); a
    teacher's name means that teacher alone; a :data:`LADDER_METHODS` entry means every teacher of
    ``ladder``, the teachers' names ordered by FLOPs per token, smallest first. ``teacher_budget``
    (see :mod:`student_trainer.kd.budget`) replaces ``selection_ratio`` when set.
    """

    teacher_selection: str | None = "small"
    data_selection: str = "none"
    selection_ratio: float = 1.0
    exact_budget: bool = False
    supervision: str = "kd"
    pt_features: str = "cls"
    kd_loss: str = "kl"
    temperature: float = 1.0
    ce_alpha: float = 1.0
    kd_alpha: float = 1.0
    lambda_kl: float = 1.0
    lambda_pt: float = 1.0
    ladder: tuple[str, ...] = TEACHER_ROLES
    teacher_budget: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("teacher_selection", (None, *LADDER_METHODS, *self.ladder)),
            ("data_selection", SELECTION_STRATEGIES),
            ("supervision", SUPERVISIONS),
            ("pt_features", PT_FEATURES),
            ("kd_loss", KD_LOSS_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.teacher_budget is not None:
            TeacherBudget.parse(self.teacher_budget)  # a ValueError names what is wrong
            if self.data_selection == "none":
                raise ValueError("teacher_budget needs a data_selection (random, entropy, margin or lc)")

    @property
    def budget(self) -> TeacherBudget | None:
        return None if self.teacher_budget is None else TeacherBudget.parse(self.teacher_budget)

    @property
    def teacher_roles(self) -> tuple[str, ...]:
        """The teachers the method queries (none without KD)."""
        if self.teacher_selection is None:
            return ()
        if self.teacher_selection in LADDER_METHODS:
            return self.ladder
        return (self.teacher_selection,)

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the patient loss runs (and so the student keeps its hidden states)."""
        return self.teacher_selection is not None and self.supervision in ("pkd", "uncertainty")
