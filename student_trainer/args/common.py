"""What `distill` and `finetune` share: the model and data options, and the checks of the training
options both have."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.model_path import require_model_dir
from student_trainer.data.loading import check_data_source
from student_trainer.train.metrics import METRICS


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, **extra: Any) -> Any:
    """A dataclass field carrying its command-line help (and allowed values, aliases) for the parser."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelArguments:
    """The model that is trained: a pretrained checkpoint, optionally cut to its first layers."""

    model_name_or_path: str | None = option(
        None,
        "Pretrained model (local folder or hub id): the student's start in distill, the teacher's in "
        "finetune.",
    )
    num_layers: int | None = option(
        None,
        "Keep only the first m encoder layers of that model (default: all of them).",
        aliases=["--student_num_layers"],
    )

    def validate(self) -> None:
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required (the pretrained model training starts from)")
        require_model_dir(self.model_name_or_path)
        if self.num_layers is not None and self.num_layers < 1:
            raise UserError(f"--num_layers (--student_num_layers) must be >= 1, got {self.num_layers}")


@dataclass
class DataArguments:
    """Where the training and evaluation data come from (see :mod:`student_trainer.data.loading`)."""

    task: str | None = option(
        None, "Registered task (sst2, cola, mrpc, rte, mnli, qnli, qqp, sst5, imdb, synthetic, ...)."
    )
    data_dir: str | None = option(None, "Folder holding the task's files (GLUE layout).")
    train_file: str | None = option(None, "A .tsv/.csv/.jsonl training file instead of --task.")
    validation_file: str | None = option(None, "The matching evaluation file (optional).")
    dataset_name: str | None = option(
        None,
        "A Hugging Face `datasets` dataset instead of --task: a hub id, a loading script or a folder written "
        "by save_to_disk; trains on its train split, evaluates on its validation split if any "
        "(needs the optional `datasets` package).",
    )
    dataset_config: str | None = option(None, "The configuration of --dataset_name (e.g. sst2 of glue).")
    text_columns: str = option("sentence", "Comma-separated text column(s) of the data files.")
    label_column: str = option("label", "Label column of --train_file/--validation_file.")
    metric: str | None = option(
        None,
        "Metric reported besides accuracy: f1 or mcc (default: the task's own; accuracy for files).",
        choices=METRICS,
    )
    skip_bad_rows: bool = option(False, "Skip (and count) malformed data rows instead of failing.")
    max_train_samples: int | None = option(None, "Use only the first N training examples.")
    skip_train_samples: int = option(
        0,
        "Skip the first N training examples (before --max_train_samples): a transfer set disjoint from the "
        "rows a teacher was fine-tuned on.",
    )
    hide_train_labels: bool = option(
        False,
        "Train without the training rows' labels (a transfer set: the teacher is the only supervision; the "
        "cross-entropy term is zero and only the rows sent to a teacher teach). Evaluation keeps its labels.",
    )
    max_eval_samples: int | None = option(None, "Use only the first N evaluation examples.")
    max_seq_length: int = option(128, "Truncate inputs to this many tokens.")

    def validate(self) -> None:
        require_positive(self, "max_seq_length")
        check_data_source(self.task, self.data_dir, self.train_file, self.dataset_name)
        require_non_negative(self, "skip_train_samples")


def require_positive(args: object, *names: str) -> None:
    """Sizes, rates and ``step % N`` periods: zero or less would fail deep inside torch or the loop."""
    for name in names:
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")


def require_non_negative(args: object, *names: str) -> None:
    for name in names:
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")


def check_output_dir(output_dir: str | None) -> None:
    """A file where the folder (or one above it) should be would only fail at the first save."""
    if not output_dir:
        raise UserError("--output_dir is required")
    path = Path(output_dir)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--output_dir {output_dir}: {folder} is a file, not a folder")
            return
