"""Every `student-trainer distill` and `finetune` option, as dataclasses with HF ``TrainingArguments`` names.

The same keys work on the command line and in a YAML file given with ``--config``; the
command line wins over the file, the file over the defaults. One declaration drives the
parser, the YAML checks and the validation, so a flag can never exist in one and not the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import UserError
from student_trainer.kd.config import PT_FEATURES, SUPERVISIONS, TEACHER_ROLES, TEACHER_SELECTIONS, KDConfig
from student_trainer.kd.losses import KD_LOSS_KINDS
from student_trainer.kd.selection import SELECTION_STRATEGIES
from student_trainer.train.metrics import METRICS

STRATEGIES = ("no", "steps", "epoch")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its command-line help (and allowed values)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DistillArguments:
    # -- student and data ------------------------------------------------------------------------
    model_name_or_path: str | None = option(
        None, "Pretrained BERT (local dir or hub id) whose first layers initialise the student."
    )
    student_num_layers: int | None = option(
        None, "Keep only the first m encoder layers of that model (default: all of them)."
    )
    task: str | None = option(None, "Registered task name (sst2, mrpc, cola, rte, ..., synthetic).")
    data_dir: str | None = option(None, "Folder holding the task's files (GLUE layout).")
    train_file: str | None = option(None, "A .tsv/.csv/.jsonl training file instead of --task.")
    validation_file: str | None = option(None, "The matching evaluation file (optional).")
    text_columns: str = option("sentence", "Comma-separated text column(s) of the data files.")
    label_column: str = option("label", "Label column of --train_file/--validation_file.")
    metric: str | None = option(
        None,
        "Metric reported besides accuracy: f1 or mcc (default: the task's own; accuracy for files).",
        choices=METRICS,
    )
    skip_bad_rows: bool = option(False, "Skip (and count) malformed data rows instead of failing.")
    max_train_samples: int | None = option(None, "Use only the first N training examples.")
    max_eval_samples: int | None = option(None, "Use only the first N evaluation examples.")
    max_seq_length: int = option(128, "Truncate inputs to this many tokens.")

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
    save_total_limit: int | None = option(None, "Keep at most N checkpoints (oldest deleted first).")
    resume_from_checkpoint: str | None = option(
        None,
        "A checkpoint-<step> folder; 'latest' for the newest one in --output_dir; 'auto' for the newest "
        "one if there is any, else a fresh start (a job its supervisor restarts).",
    )
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    disable_tqdm: bool = option(False, "Hide the progress bars.")

    # -- knowledge distillation ------------------------------------------------------------------
    teacher: list[str] = option(
        [], "ROLE=SPEC, ROLE small or large; SPEC local:PATH or URL[,URL...][#MODEL]. Repeat for two."
    )
    teacher_selection: str | None = option(
        None, "Which teacher(s) supervise (default: the only one given).", choices=TEACHER_SELECTIONS
    )
    no_kd: bool = option(False, "Baseline: cross-entropy only, no teacher at all.")
    data_selection: str = option(
        "none", "Which instances get teacher supervision.", choices=SELECTION_STRATEGIES
    )
    selection_ratio: float = option(1.0, "Fraction r of each batch sent to the teacher(s): int(B*r) rows.")
    exact_budget: bool = option(False, "Carry the fractional remainder so an epoch selects round(N*r).")
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
        """``{role: spec}`` parsed from the ``--teacher ROLE=SPEC`` entries."""
        parsed: dict[str, str] = {}
        for entry in self.teacher:
            role, sep, spec = entry.partition("=")
            if not sep or role not in TEACHER_ROLES or not spec.strip():
                raise UserError(f"--teacher takes ROLE=SPEC with ROLE in {TEACHER_ROLES}, got {entry!r}")
            if role in parsed:
                raise UserError(f"--teacher {role}= given twice")
            parsed[role] = spec.strip()
        return parsed

    @property
    def kd(self) -> KDConfig:
        """What the distillation maths reads (after :meth:`validate`)."""
        return KDConfig(
            teacher_selection=None if self.no_kd else self.teacher_selection,
            data_selection=self.data_selection,
            selection_ratio=self.selection_ratio,
            exact_budget=self.exact_budget,
            supervision=self.supervision,
            pt_features=self.pt_features,
            kd_loss=self.kd_loss,
            temperature=self.temperature,
            ce_alpha=self.ce_alpha,
            kd_alpha=self.kd_alpha,
            lambda_kl=self.lambda_kl,
            lambda_pt=self.lambda_pt,
        )

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
        if bool(self.task) == bool(self.train_file):
            raise UserError("give either --task (with --data_dir) or --train_file")
        if self.task and not self.data_dir:
            raise UserError("--task needs --data_dir")
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise UserError(f"--{f.name} must be one of {list(choices)}, got {value!r}")
        teachers = self.teachers
        if not self.no_kd:
            if not teachers:
                raise UserError("give --teacher small=SPEC and/or --teacher large=SPEC, or --no_kd")
            if self.teacher_selection is None:
                if len(teachers) > 1:
                    raise UserError(f"two teachers: choose --teacher_selection from {TEACHER_SELECTIONS}")
                self.teacher_selection = next(iter(teachers))
            missing = [role for role in self.teacher_roles if role not in teachers]
            if missing:
                raise UserError(
                    f"--teacher_selection {self.teacher_selection} needs --teacher {missing[0]}=SPEC"
                )
        if not 0.0 <= self.selection_ratio <= 1.0:
            raise UserError(f"--selection_ratio must be in [0, 1], got {self.selection_ratio}")
        if self.data_selection == "none" and self.selection_ratio != 1.0:
            raise UserError("--selection_ratio needs --data_selection random, entropy, margin or lc")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        check_training_options(self)
        _require_positive(
            self, "eval_steps", "save_steps", "temperature", "teacher_timeout", "teacher_ready_timeout"
        )
        _require_non_negative(self, "adam_epsilon")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise UserError(f"--student_num_layers must be >= 1, got {self.student_num_layers}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- checks both commands share --------------------------------------------------------------------


def _require_positive(args: object, *names: str) -> None:
    """Sizes, rates and ``step % N`` periods: zero or less would fail deep inside torch or the loop."""
    for name in names:
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")


def _require_non_negative(args: object, *names: str) -> None:
    for name in names:
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")


def _check_output_dir(output_dir: str | None) -> None:
    """A file where the folder (or one above it) should be would only fail at the first save."""
    if not output_dir:
        raise UserError("--output_dir is required")
    path = Path(output_dir)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--output_dir {output_dir}: {folder} is a file, not a folder")
            return


def check_training_options(args: DistillArguments | FinetuneArguments) -> None:
    """The options `distill` and `finetune` both have, checked the same way."""
    _require_positive(args, "per_device_train_batch_size", "per_device_eval_batch_size", "max_seq_length")
    _require_positive(args, "logging_steps", "learning_rate")
    _require_non_negative(args, "weight_decay", "max_grad_norm")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise UserError(f"--warmup_ratio must be in [0, 1], got {args.warmup_ratio}")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise UserError("--num_train_epochs must be > 0 (or give --max_steps)")
    _check_output_dir(args.output_dir)


# -- command line and YAML ------------------------------------------------------------------------


_FIELDS = {f.name: f for f in dataclasses.fields(DistillArguments)}
_HINTS = typing.get_type_hints(DistillArguments)


def _is_list(name: str) -> bool:
    return typing.get_origin(_HINTS[name]) is list


def _base_type(name: str) -> type:
    """``int | None`` -> int, ``list[str]`` -> str: the type one value of field ``name`` has."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if _is_list(name):
        hint = typing.get_args(hint)[0]
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field. Defaults are left out (SUPPRESS) so YAML values can sit under the CLI."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these keys.")
    for f in dataclasses.fields(DistillArguments):
        kind = _base_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif _is_list(f.name):
            parser.add_argument(
                f"--{f.name}", action="append", type=kind, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                f"--{f.name}",
                type=kind,
                choices=f.metadata["choices"],
                default=argparse.SUPPRESS,
                help=help_text,
            )


def _coerce_yaml(name: str, value: Any, source: Path) -> Any:
    """Check one YAML value against the field's type (YAML already typed it)."""
    kind = _base_type(name)
    if value is None:  # `key:` with nothing after it
        if type(None) in typing.get_args(_HINTS[name]):
            return None
        wanted = f"a list of {kind.__name__}" if _is_list(name) else kind.__name__
        raise UserError(f"{source}: key {name!r} has no value; it must be {wanted}")
    if name == "teacher" and isinstance(value, dict):  # teacher: {small: SPEC, large: SPEC}
        return [f"{role}={_coerce_yaml_scalar(name, spec, str, source)}" for role, spec in value.items()]
    if _is_list(name):
        values = value if isinstance(value, list) else [value]
        return [_coerce_yaml_scalar(name, v, kind, source) for v in values]
    return _coerce_yaml_scalar(name, value, kind, source)


def _coerce_yaml_scalar(name: str, value: Any, kind: type, source: Path) -> Any:
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 5e-5 as a string
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{source}: key {name!r} must be {kind.__name__}, got {value!r}")
    return value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of option names to values, rejecting unknown keys by name."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: the config must be a mapping of option names to values")
    unknown = sorted(str(k) for k in loaded if k not in _FIELDS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (keys are the distill option names)")
    return {key: _coerce_yaml(key, value, path) for key, value in loaded.items()}


def arguments_from_namespace(namespace: argparse.Namespace) -> DistillArguments:
    """Defaults, then the YAML file, then the flags actually given; validated."""
    values: dict[str, Any] = {}
    config = getattr(namespace, "config", None)
    if config:
        values.update(load_yaml_config(config))
    values.update({k: v for k, v in vars(namespace).items() if k in _FIELDS})
    return DistillArguments(**values).validate()


def parse_distill_args(argv: list[str]) -> DistillArguments:
    """Parse a `distill` command line on its own (tests and scripts)."""
    parser = argparse.ArgumentParser(prog="student-trainer distill")
    add_arguments(parser)
    return arguments_from_namespace(parser.parse_args(argv))


@dataclass
class FinetuneArguments:
    """`student-trainer finetune` options (Hugging Face ``TrainingArguments`` names)."""

    model_name_or_path: str = option(None, "Checkpoint to fine-tune (local dir or hub id).")
    output_dir: str = option(None, "Where the fine-tuned teacher is saved.")
    num_layers: int | None = option(None, "Keep only the first m encoder layers (default: all).")
    task: str | None = option(
        None, "Registered task (sst2, cola, mrpc, rte, mnli, qnli, qqp, sst5, imdb, ...)."
    )
    data_dir: str | None = option(None, "Folder with the task's files (GLUE layout).")
    train_file: str | None = option(None, "A .tsv/.csv/.jsonl training file instead of --task.")
    validation_file: str | None = option(None, "The matching evaluation file.")
    text_columns: str = option("sentence", "Comma-separated text column(s) of --train_file.")
    label_column: str = option("label", "Label column of --train_file.")
    metric: str | None = option(
        None,
        "Metric reported besides accuracy: f1 or mcc (default: the task's own; accuracy for files).",
        choices=METRICS,
    )
    skip_bad_rows: bool = option(False, "Skip (and count) malformed rows instead of failing.")
    max_train_samples: int | None = option(None, "Use only the first N training examples.")
    max_eval_samples: int | None = option(None, "Use only the first N evaluation examples.")
    max_seq_length: int = option(128, "Truncate inputs to this many tokens.")
    learning_rate: float = option(2e-5, "Peak AdamW learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).")
    num_train_epochs: float = option(3.0, "Epochs (fractions allowed); --max_steps > 0 overrides.")
    max_steps: int = option(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    per_device_train_batch_size: int = option(32, "Training batch size.")
    per_device_eval_batch_size: int = option(64, "Evaluation batch size.")
    warmup_ratio: float = option(0.1, "Fraction of the steps used for linear warm-up.")
    seed: int = option(42, "Seed for the head's initialisation, data order and dropout.")
    logging_steps: int = option(50, "Print the running loss every N steps.")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    disable_tqdm: bool = option(False, "Hide the progress bar.")

    def validate(self) -> FinetuneArguments:
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required")
        check_training_options(self)
        return self
