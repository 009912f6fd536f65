"""`student-trainer distill` options: the model and data, the KD knobs, and Hugging Face's
``TrainingArguments`` (every flag of them) — parsed by :mod:`student_trainer.args.parser`; the maths
reads the :class:`~student_trainer.kd.config.KDConfig` that :attr:`KDArguments.kd` makes of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shared.errors import UserError
from shared.prompting import LabelPrompt
from student_trainer.args.common import (
    DataArguments,
    ModelArguments,
    check_output_dir,
    option,
    require_positive,
)
from student_trainer.args.parser import CommandArguments, CommandParser
from student_trainer.args.training import DistillTrainingArguments
from student_trainer.kd.budget import TeacherBudget
from student_trainer.kd.config import (
    LADDER_METHODS,
    PT_FEATURES,
    SUPERVISIONS,
    TEACHER_NAME,
    TEACHER_ROLES,
    KDConfig,
)
from student_trainer.kd.losses import KD_LOSS_KINDS
from student_trainer.kd.selection import SELECTION_STRATEGIES


@dataclass
class KDArguments:
    """The teachers and how they supervise which rows."""

    # -- knowledge distillation ------------------------------------------------------------------
    teacher: list[str] = option(
        [],
        "NAME=SPEC (NAME: small, large or any name; SPEC local:PATH, URL[,URL...][#MODEL] or "
        "openai+URL#MODEL). Repeat for a ladder of teachers, ordered by their FLOPs per token.",
    )
    teacher_store: str = option(
        "auto",
        "Where teacher answers are kept across runs (SQLite): a file, 'none', or 'auto': "
        "$DKD_CACHE/teacher_answers.sqlite (else ~/.cache/dkd/) for teachers behind other servers "
        "(openai+...), whose calls are billed; a file given here stores every teacher's answers.",
    )
    teacher_store_max_mb: int = option(2048, "Size bound of --teacher_store: older entries are evicted.")
    teacher_prompt: list[str] = option(
        [],
        "NAME=FILE: the prompt and label_words (YAML) that the openai+ teacher NAME is asked with.",
    )
    teacher_selection: str | None = option(
        None,
        f"Which teacher(s) supervise: a teacher's NAME or one of {', '.join(LADDER_METHODS)} (every "
        "teacher of the ladder); default: the only one given.",
    )
    no_kd: bool = option(False, "Baseline: cross-entropy only, no teacher at all.")
    data_selection: str = option(
        "none", "Which instances get teacher supervision.", choices=SELECTION_STRATEGIES
    )
    selection_ratio: float = option(1.0, "Fraction r of each batch sent to the teacher(s): int(B*r) rows.")
    exact_budget: bool = option(False, "Carry the fractional remainder so an epoch selects round(N*r).")
    teacher_budget: str | None = option(
        None,
        "Teacher FLOPs the whole run may spend instead of a ratio: 500GF, 2TF, or a share of vanilla KD's "
        "unpadded FLOPs (10%%); paced over the run, rows bought by uncertainty per teacher FLOP.",
    )
    supervision: str = option("kd", "Distillation objective.", choices=SUPERVISIONS)
    lambda_kl: float = option(1.0, "Weight of the logit (KD) term.")
    lambda_pt: float = option(1.0, "Weight of the patient (hidden-state) term for pkd/uncertainty.")
    pt_features: str = option("cls", "Hidden-state features of the patient loss.", choices=PT_FEATURES)
    kd_loss: str = option("kl", "Loss on logits: KL at --temperature or MSE.", choices=KD_LOSS_KINDS)
    temperature: float = option(1.0, "Softmax temperature of the KL loss.")
    ce_alpha: float = option(1.0, "Weight of the cross-entropy term (every instance).")
    kd_alpha: float = option(1.0, "Weight of the whole distillation term (selected instances).")
    teacher_timeout: float = option(60.0, "Seconds one teacher request may take (HTTP backend).")
    teacher_ready_timeout: float = option(120.0, "Seconds to wait for the teachers to become ready.")
    api_key_env: str | None = option(None, "Environment variable holding the service's API key.")

    # -- derived ---------------------------------------------------------------------------------

    @property
    def teachers(self) -> dict[str, str]:
        """``{name: spec}`` parsed from the ``--teacher NAME=SPEC`` entries, in their order."""
        parsed: dict[str, str] = {}
        for entry in self.teacher:
            role, sep, spec = entry.partition("=")
            if not sep or not TEACHER_NAME.match(role) or role in LADDER_METHODS or not spec.strip():
                raise UserError(
                    "--teacher takes NAME=SPEC with NAME letters, digits, '_' or '-' (small, large or your "
                    f"own; not {', '.join(LADDER_METHODS)}), got {entry!r}"
                )
            if role in parsed:
                raise UserError(f"--teacher {role}= given twice")
            parsed[role] = spec.strip()
        return parsed

    @property
    def teacher_prompts(self) -> dict[str, LabelPrompt]:
        """``{name: prompt}`` from the ``--teacher_prompt NAME=FILE`` entries."""
        prompts = {}
        for entry in self.teacher_prompt:
            role, sep, path = entry.partition("=")
            if not sep or role not in self.teachers:
                raise UserError(f"--teacher_prompt takes NAME=FILE with NAME a --teacher, got {entry!r}")
            if not self.teachers[role].startswith("openai+"):
                raise UserError(
                    f"--teacher_prompt {role}=: only an openai+ teacher is asked a prompt by the trainer "
                    "(a prompted teacher of the service has its prompt in the service's config)"
                )
            prompts[role] = LabelPrompt.read(path)
        return prompts

    @property
    def kd(self) -> KDConfig:
        """What the distillation maths reads (after :meth:`validate`)."""
        names = {f.name for f in dataclasses.fields(KDConfig)} - {"ladder"}
        knobs = {name: getattr(self, name) for name in names}  # same names as the flags
        selection = None if self.no_kd else self.teacher_selection
        # the teachers in the command line's order; the run orders them by FLOPs per token once
        # their metadata is known (student_trainer.train.setup.ladder_order)
        ladder = tuple(self.teachers) or TEACHER_ROLES
        return KDConfig(**{**knobs, "teacher_selection": selection, "ladder": ladder})

    @property
    def teacher_roles(self) -> tuple[str, ...]:
        """The teachers the chosen method queries (none for ``--no_kd``)."""
        return self.kd.teacher_roles

    @property
    def uses_hidden_states(self) -> bool:
        return self.kd.uses_hidden_states

    def validate(self) -> None:
        """Fill what can be inferred and reject contradictions, each with a one-line reason."""
        teachers = self.teachers
        if not self.no_kd:
            if not teachers:
                raise UserError("give --teacher small=SPEC and/or --teacher large=SPEC, or --no_kd")
            if self.teacher_selection is None:
                if len(teachers) > 1:
                    raise UserError(
                        f"{len(teachers)} teachers: choose --teacher_selection from "
                        f"{(*teachers, *LADDER_METHODS)}"
                    )
                self.teacher_selection = next(iter(teachers))
            if self.teacher_selection in LADDER_METHODS and len(teachers) < 2:
                missing = [role for role in TEACHER_ROLES if role not in teachers] or ["NAME"]
                raise UserError(
                    f"--teacher_selection {self.teacher_selection} needs --teacher {missing[0]}=SPEC "
                    "(a second teacher)"
                )
            if self.teacher_selection not in (*LADDER_METHODS, *teachers):
                raise UserError(
                    f"--teacher_selection must be a teacher given with --teacher ({', '.join(teachers)}) "
                    f"or one of {LADDER_METHODS}, got {self.teacher_selection!r}"
                )
        if not 0.0 <= self.selection_ratio <= 1.0:
            raise UserError(f"--selection_ratio must be in [0, 1], got {self.selection_ratio}")
        if self.data_selection == "none" and self.selection_ratio != 1.0:
            raise UserError("--selection_ratio needs --data_selection random, entropy, margin or lc")
        if self.teacher_budget is not None:
            self.check_teacher_budget()
        require_positive(self, "temperature", "teacher_timeout", "teacher_ready_timeout")

    def check_teacher_budget(self) -> None:
        """A budget replaces the ratio: it needs a strategy to rank rows and nothing that fixes counts."""
        if self.no_kd:
            raise UserError("--teacher_budget needs a teacher (it cannot go with --no_kd)")
        if self.data_selection == "none":
            raise UserError("--teacher_budget needs --data_selection random, entropy, margin or lc")
        if self.selection_ratio != 1.0 or self.exact_budget:
            raise UserError(
                "--teacher_budget replaces --selection_ratio and --exact_budget: give one or the other"
            )
        try:
            TeacherBudget.parse(self.teacher_budget or "")
        except ValueError as err:
            raise UserError(str(err)) from None


class DistillArguments(CommandArguments):
    """Every `distill` option (see :class:`CommandArguments`)."""

    PARTS = (ModelArguments, DataArguments, KDArguments, DistillTrainingArguments)

    def validate(self) -> DistillArguments:
        for part in self.parts[:3]:
            part.validate()
        if self.hide_train_labels and (self.no_kd or self.kd_alpha == 0):
            raise UserError("--hide_train_labels leaves the teacher as the only supervision: it needs KD")
        check_output_dir(self.training.given_output_dir)
        return self

    @property
    def training(self) -> DistillTrainingArguments:
        return self.part(DistillTrainingArguments)


def parse_distill_args(argv: list[str]) -> DistillArguments:
    """Parse a `distill` command line on its own (tests and scripts)."""
    parser = CommandParser(prog="student-trainer distill")
    parser.add_options(DistillArguments)
    return parser.arguments(parser.parse_args(argv), DistillArguments)
