"""`student-trainer distill` options: Hugging Face ``TrainingArguments`` names plus the KD knobs.

Built into flags and YAML keys by :mod:`student_trainer.args.builder`; the maths reads the
:class:`~student_trainer.kd.config.KDConfig` that :attr:`DistillArguments.kd` makes of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.errors import UserError
from shared.model_path import require_model_dir
from shared.prompting import LabelPrompt
from student_trainer.args.builder import check_choices, option, parse_arguments
from student_trainer.args.common import (
    DataArguments,
    check_training_options,
    require_non_negative,
    require_positive,
)
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

STRATEGIES = ("no", "steps", "epoch")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class DistillArguments(DataArguments):
    """`student-trainer distill` options (Hugging Face ``TrainingArguments`` names, the data options
    of :class:`DataArguments`, the KD knobs)."""

    # -- student and data ------------------------------------------------------------------------
    model_name_or_path: str | None = option(
        None, "Pretrained BERT (local dir or hub id) whose first layers initialise the student."
    )
    student_num_layers: int | None = option(
        None, "Keep only the first m encoder layers of that model (default: all of them)."
    )

    # -- training (Hugging Face TrainingArguments names and defaults) -----------------------------
    output_dir: str | None = option(None, "Where checkpoints, logs, the final model and results.json go.")
    overwrite_output_dir: bool = option(
        False, "Start afresh in an --output_dir that holds checkpoints of another run (deletes them)."
    )
    learning_rate: float = option(5e-5, "Peak AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).")
    num_train_epochs: float = option(3.0, "Epochs to train (fractions allowed); --max_steps > 0 overrides.")
    max_steps: int = option(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    per_device_train_batch_size: int = option(8, "Training batch size per process.")
    per_device_eval_batch_size: int = option(8, "Evaluation batch size.")
    lr_scheduler_type: str = option("linear", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_ratio: float = option(0.0, "Fraction of the total steps used for linear warm-up.")
    warmup_steps: int = option(0, "Warm-up steps (overrides --warmup_ratio when > 0).")
    seed: int = option(42, "Seed for initialisation, data order, dropout and random selection.")
    logging_steps: int = option(50, "Print and log averaged training metrics every N steps.")
    eval_strategy: str = option("epoch", "When to evaluate during training.", choices=STRATEGIES)
    eval_steps: int | None = option(
        None, "Evaluate every N steps (eval_strategy=steps; default: logging_steps)."
    )
    save_strategy: str = option("steps", "When to write checkpoints.", choices=STRATEGIES)
    save_steps: int = option(500, "Write a checkpoint every N steps (save_strategy=steps).")
    save_total_limit: int | None = option(
        2,
        "Keep at most N checkpoints, oldest deleted first; 0 keeps all. Each holds the optimizer state "
        "resume needs (about 200 MB for a 6-layer BERT-base student), so 2: the newest to resume from "
        "and one before it in case the newest is lost or damaged.",
    )
    resume_from_checkpoint: str | None = option(
        None,
        "A checkpoint-<step> folder; 'latest' for the newest one in --output_dir; 'auto' for the newest "
        "one if there is any, else a fresh start (a job its supervisor restarts).",
    )
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    disable_tqdm: bool = option(False, "Hide the progress bars.")

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

    def validate(self) -> DistillArguments:
        """Fill what can be inferred and reject contradictions, each with a one-line reason."""
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required (the pretrained model the student starts from)")
        require_model_dir(self.model_name_or_path)
        self.check_data()
        check_choices(self)
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
        if self.hide_train_labels and (self.no_kd or self.kd_alpha == 0):
            raise UserError("--hide_train_labels leaves the teacher as the only supervision: it needs KD")
        if not 0.0 <= self.selection_ratio <= 1.0:
            raise UserError(f"--selection_ratio must be in [0, 1], got {self.selection_ratio}")
        if self.data_selection == "none" and self.selection_ratio != 1.0:
            raise UserError("--selection_ratio needs --data_selection random, entropy, margin or lc")
        if self.teacher_budget is not None:
            self.check_teacher_budget()
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        check_training_options(self)
        require_positive(
            self, "eval_steps", "save_steps", "temperature", "teacher_timeout", "teacher_ready_timeout"
        )
        require_non_negative(self, "adam_epsilon")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise UserError(f"--student_num_layers must be >= 1, got {self.student_num_layers}")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise UserError(f"--save_total_limit must be >= 0 (0 keeps all), got {self.save_total_limit}")
        return self

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_distill_args(argv: list[str]) -> DistillArguments:
    """Parse a `distill` command line on its own (tests and scripts)."""
    return parse_arguments(DistillArguments, argv, prog="student-trainer distill")
