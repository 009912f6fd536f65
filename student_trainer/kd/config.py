"""What the distillation maths reads: a small config object, not the command line (TextBrewer's
``DistillationConfig``). ``DistillArguments.kd`` builds it; tests of the maths build it directly.

The allowed values of each knob live here (and in :mod:`~student_trainer.kd.selection` and
:mod:`~student_trainer.kd.losses` for the strategies and loss kinds); the command line takes its
``choices`` from these tuples.
"""

from __future__ import annotations

from dataclasses import dataclass

from student_trainer.kd.losses import KD_LOSS_KINDS
from student_trainer.kd.selection import SELECTION_STRATEGIES

TEACHER_ROLES = ("small", "large")
TEACHER_SELECTIONS = ("small", "large", "ensemble", "hard", "soft", "soft-batch")
SUPERVISIONS = ("kd", "pkd", "uncertainty")
PT_FEATURES = ("cls", "all-tokens")


@dataclass(frozen=True)
class KDConfig:
    """The three dynamic-KD decisions and the loss weights (see :mod:`student_trainer.kd.objective`).

    ``teacher_selection`` None means no teacher at all (the cross-entropy-only baseline).
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

    def __post_init__(self) -> None:
        for name, allowed in (
            ("teacher_selection", (None, *TEACHER_SELECTIONS)),
            ("data_selection", SELECTION_STRATEGIES),
            ("supervision", SUPERVISIONS),
            ("pt_features", PT_FEATURES),
            ("kd_loss", KD_LOSS_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def teacher_roles(self) -> tuple[str, ...]:
        """The teachers the method queries (none without KD)."""
        if self.teacher_selection is None:
            return ()
        if self.teacher_selection in TEACHER_ROLES:
            return (self.teacher_selection,)
        return TEACHER_ROLES

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the patient loss runs (and so the student keeps its hidden states)."""
        return self.teacher_selection is not None and self.supervision in ("pkd", "uncertainty")
