"""What the CLIs' data options mean: ``--task``/``--data_dir``, ``--train_file`` [``--validation_file``],
or ``--dataset_name`` [``--dataset_config``] (Hugging Face ``datasets``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from shared.errors import UserError
from student_trainer.data.readers import hf_split_names, load_file, load_hf_dataset, load_task
from student_trainer.data.tasks import (
    UNLABELLED,
    TaskData,
    get_task_spec,
)


def split_columns(text_columns: str | Sequence[str | int]) -> list[str | int]:
    """``"sentence1,sentence2"`` (a command-line value) or a list -> a list of column names."""
    if isinstance(text_columns, str):
        return [c.strip() for c in text_columns.split(",") if c.strip()]
    return list(text_columns)


def check_data_source(
    task: str | None,
    data_dir: str | Path | None,
    train_file: str | Path | None,
    dataset_name: str | None = None,
) -> None:
    """The rule of the data options: a registered task with its folder, a training file, or a dataset."""
    if sum(bool(source) for source in (task, train_file, dataset_name)) != 1:
        raise UserError("give either --task (with --data_dir), --train_file or --dataset_name")
    if task and not data_dir:
        raise UserError("--task needs --data_dir")


def load_train_and_eval(
    *,
    task: str | None = None,
    data_dir: str | Path | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_columns: str | Sequence[str | int] = "sentence",
    label_column: str | int = "label",
    skip_bad_rows: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    metric: str | None = None,
    skip_train_samples: int = 0,
    hide_train_labels: bool = False,
) -> tuple[TaskData, TaskData | None]:
    """What the CLIs' data options mean: ``--task``/``--data_dir`` (train + the task's eval split),
    ``--train_file`` [``--validation_file``] with a column mapping, or ``--dataset_name``
    [``--dataset_config``] (its ``train`` split, and its ``validation`` split when it has one);
    eval labels follow the train labels. ``metric`` replaces the task's own (files and datasets
    default to accuracy: e.g. CoLA augmented into a file still wants MCC). ``skip_train_samples``
    drops the first training rows and ``hide_train_labels`` their labels: a transfer set.
    """
    check_data_source(task, data_dir, train_file, dataset_name)
    wanted = None if max_train_samples is None else skip_train_samples + max_train_samples
    limits = (wanted, max_eval_samples)
    max_train_samples = wanted
    if task:
        train, evaluation = _task_splits(task, data_dir, skip_bad_rows, limits)
    elif train_file:
        columns = split_columns(text_columns)
        file_options = {"text_columns": columns, "label_column": label_column, "skip_bad_rows": skip_bad_rows}
        train = load_file(train_file, **file_options, max_examples=max_train_samples)  # type: ignore[arg-type]
        _require_two_labels(train, str(train_file))
        evaluation = None
        if validation_file:
            evaluation = load_file(
                validation_file, **file_options, label_names=train.label_names, max_examples=max_eval_samples
            )
    else:
        assert dataset_name is not None
        train, evaluation = _dataset_splits(
            dataset_name, dataset_config, text_columns, str(label_column), limits
        )
    train = transfer_set(train, skip_train_samples, hide_train_labels)
    if metric is not None:
        if metric == "f1" and train.num_labels != 2:
            raise UserError(f"--metric f1 is binary F1, but the data has {train.num_labels} labels")
        for split in (train, evaluation):
            if split is not None:
                split.metric = metric
    return train, evaluation


def transfer_set(train: TaskData, skip: int, hide_labels: bool) -> TaskData:
    """The training rows from the ``skip``-th on, without their labels if ``hide_labels`` (the label
    names stay: the student's head and the teachers' classes are the task's)."""
    if skip >= len(train.examples) and skip:
        raise UserError(f"--skip_train_samples {skip}: the training data has only {len(train.examples)} rows")
    examples = train.examples[skip:]
    if hide_labels:
        examples = [dataclasses.replace(e, label=UNLABELLED) for e in examples]
    return dataclasses.replace(train, examples=examples)


def _task_splits(
    task: str, data_dir: str | Path | None, skip_bad_rows: bool, limits: tuple[int | None, int | None]
) -> tuple[TaskData, TaskData]:
    spec = get_task_spec(task)
    assert data_dir is not None
    train = load_task(task, data_dir, "train", skip_bad_rows=skip_bad_rows, max_examples=limits[0])
    _require_two_labels(train, f"{data_dir} ({task} train)")
    evaluation = load_task(
        task, data_dir, spec.eval_split, skip_bad_rows=skip_bad_rows, max_examples=limits[1]
    )
    return train, evaluation


def _dataset_splits(
    name: str,
    config: str | None,
    text_columns: str | Sequence[str | int],
    label_column: str,
    limits: tuple[int | None, int | None],
) -> tuple[TaskData, TaskData | None]:
    """A ``datasets`` dataset's ``train`` split, and its ``validation`` split when it has one."""
    options = {"config": config, "text_columns": [str(c) for c in split_columns(text_columns)]}
    train = load_hf_dataset(name, **options, split="train", label_column=label_column, max_examples=limits[0])
    _require_two_labels(train, f"{name} (train)")
    if "validation" not in hf_split_names(name, config):
        return train, None
    evaluation = load_hf_dataset(
        name,
        **options,
        split="validation",
        label_column=label_column,
        label_names=train.label_names,
        max_examples=limits[1],
    )
    return train, evaluation


def _require_two_labels(train: TaskData, source: str) -> None:
    """One label would make a 1-output (regression) head and KD against a 2-way teacher fail."""
    present = sorted({train.label_names[e.label] for e in train.examples if e.label != UNLABELLED})
    if len(present) < 2:
        shown = ", ".join(repr(name) for name in present)
        raise UserError(
            f"{source}: the training data has {len(present)} distinct label ({shown}); "
            "a classifier needs at least 2"
        )


#: The data options `distill` and `finetune` share (same names on both argument dataclasses).
DATA_OPTIONS = (
    "task",
    "data_dir",
    "train_file",
    "validation_file",
    "dataset_name",
    "dataset_config",
    "text_columns",
    "label_column",
    "metric",
    "skip_bad_rows",
    "max_train_samples",
    "max_eval_samples",
    "skip_train_samples",
    "hide_train_labels",
)


def load_train_and_eval_from(options: object) -> tuple[TaskData, TaskData | None]:
    """:func:`load_train_and_eval` with the data options of a command's argument dataclass."""
    return load_train_and_eval(**{name: getattr(options, name) for name in DATA_OPTIONS})
