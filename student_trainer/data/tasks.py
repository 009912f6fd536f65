"""The task registry: what each GLUE-style task ships (files, columns, labels, metric), and the
:class:`TaskData` every loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

UNLABELLED = -1


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int  # UNLABELLED (-1) for GLUE test rows


@dataclass
class TaskData:
    """One split of one task, ready to tokenize."""

    name: str
    label_names: list[str]
    metric: str  # "accuracy" | "f1" | "mcc"
    examples: list[Example]
    skipped_rows: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return any(e.text_b is not None for e in self.examples)

    @property
    def is_labelled(self) -> bool:
        return all(e.label != UNLABELLED for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileFormat:
    """Where the texts and the label are in one kind of file.

    Columns are header names, or 0-based positions when the file has no header. ``label_column``
    None means unlabelled (GLUE test files).
    """

    text_columns: tuple[str | int, ...]
    label_column: str | int | None
    header: bool = True
    num_columns: int | None = None  # required when there is no header
    encoding: str = "utf-8"


@dataclass(frozen=True)
class TaskSpec:
    """A task as it ships: one file (and format) per split, label names, metric."""

    name: str
    dirnames: tuple[str, ...]  # folder names under a GLUE root: ours first, then GLUE's
    label_names: tuple[str, ...]
    metric: str
    splits: dict[str, tuple[str, FileFormat]]
    label_values: tuple[str, ...] | None = None  # raw label strings in label order (default: names)
    eval_split: str = "dev"

    @property
    def raw_labels(self) -> tuple[str, ...]:
        return self.label_values or self.label_names


def _single(label: str | None = "label") -> FileFormat:
    return FileFormat(("sentence",), label)


def _pair(a: str, b: str, label: str | None, encoding: str = "utf-8") -> FileFormat:
    return FileFormat((a, b), label, encoding=encoding)


_COLA = FileFormat((3,), 1, header=False, num_columns=4)
_MRPC = _pair("#1 String", "#2 String", "Quality", encoding="utf-8-sig")
_RTE_LABELS = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sst2",
            ("sst2", "SST-2"),
            ("negative", "positive"),
            "accuracy",
            {
                "train": ("train.tsv", _single()),
                "dev": ("dev.tsv", _single()),
                "test": ("test.tsv", _single(None)),
            },
            label_values=("0", "1"),
        ),
        TaskSpec(
            "cola",
            ("cola", "CoLA"),
            ("unacceptable", "acceptable"),
            "mcc",
            {"train": ("train.tsv", _COLA), "dev": ("dev.tsv", _COLA), "test": ("test.tsv", _single(None))},
            label_values=("0", "1"),
        ),
        TaskSpec(
            "mrpc",
            ("mrpc", "MRPC"),
            ("not_equivalent", "equivalent"),
            "f1",
            {
                "train": ("train.tsv", _MRPC),
                "dev": ("dev.tsv", _MRPC),
                "test": ("test.tsv", _pair("#1 String", "#2 String", None, encoding="utf-8-sig")),
                "msr_train": ("msr_paraphrase_train.txt", _MRPC),
                "msr_test": ("msr_paraphrase_test.txt", _MRPC),  # the labelled GLUE test pairs
            },
            label_values=("0", "1"),
        ),
        TaskSpec(
            "rte",
            ("rte", "RTE"),
            _RTE_LABELS,
            "accuracy",
            {
                "train": ("train.tsv", _pair("sentence1", "sentence2", "label")),
                "dev": ("dev.tsv", _pair("sentence1", "sentence2", "label")),
                "test": ("test.tsv", _pair("sentence1", "sentence2", None)),
            },
        ),
        TaskSpec(
            "mnli",
            ("mnli", "MNLI"),
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            {
                "train": ("train.tsv", _pair("sentence1", "sentence2", "gold_label")),
                "dev_matched": ("dev_matched.tsv", _pair("sentence1", "sentence2", "gold_label")),
                "dev_mismatched": ("dev_mismatched.tsv", _pair("sentence1", "sentence2", "gold_label")),
                "test_matched": ("test_matched.tsv", _pair("sentence1", "sentence2", None)),
                "test_mismatched": ("test_mismatched.tsv", _pair("sentence1", "sentence2", None)),
            },
            eval_split="dev_matched",
        ),
        TaskSpec(
            "qnli",
            ("qnli", "QNLI"),
            _RTE_LABELS,
            "accuracy",
            {
                "train": ("train.tsv", _pair("question", "sentence", "label")),
                "dev": ("dev.tsv", _pair("question", "sentence", "label")),
                "test": ("test.tsv", _pair("question", "sentence", None)),
            },
        ),
        TaskSpec(
            "qqp",
            ("qqp", "QQP"),
            ("not_duplicate", "duplicate"),
            "f1",
            {
                "train": ("train.tsv", _pair("question1", "question2", "is_duplicate")),
                "dev": ("dev.tsv", _pair("question1", "question2", "is_duplicate")),
                "test": ("test.tsv", _pair("question1", "question2", None)),
            },
            label_values=("0", "1"),
        ),
        TaskSpec(
            "sst5",
            ("sst5", "SST-5"),
            ("very negative", "negative", "neutral", "positive", "very positive"),
            "accuracy",
            {
                "train": ("train.tsv", _single()),
                "dev": ("dev.tsv", _single()),
                "test": ("test.tsv", _single()),
            },
            label_values=("0", "1", "2", "3", "4"),
        ),
        TaskSpec(
            "imdb",
            ("imdb", "IMDB"),
            ("negative", "positive"),
            "accuracy",
            {
                "train": ("train.tsv.gz", FileFormat(("text",), "label")),
                "test": ("test.tsv.gz", FileFormat(("text",), "label")),
            },
            label_values=("0", "1"),
            eval_split="test",
        ),
        # Generated by student_trainer.data.synthetic (SST-2 layout); not a real dataset.
        TaskSpec(
            "synthetic",
            ("synthetic",),
            ("negative", "positive"),
            "accuracy",
            {"train": ("train.tsv", _single()), "dev": ("dev.tsv", _single())},
            label_values=("0", "1"),
        ),
    )
}


def get_task_spec(task: str) -> TaskSpec:
    spec = TASKS.get(task.lower())
    if spec is None:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return spec


def task_file(spec: TaskSpec, data_dir: str | Path, split: str) -> tuple[Path, FileFormat]:
    """Find a split's file in ``data_dir`` itself (``glue_data/SST-2``) or in its task folder."""
    if split not in spec.splits:
        raise UserError(f"task {spec.name!r} has no split {split!r}; it has {', '.join(spec.splits)}")
    filename, fmt = spec.splits[split]
    data_dir = Path(data_dir)
    candidates = [data_dir / filename] + [data_dir / d / filename for d in spec.dirnames]
    for path in candidates:
        if path.is_file():
            return path, fmt
    folders = ", ".join(str(data_dir / d) for d in spec.dirnames)
    raise UserError(f"no {spec.name} {split} file {filename!r} in {data_dir} or {folders}")
