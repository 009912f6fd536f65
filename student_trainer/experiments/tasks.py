"""What a task's data look like to the report: sizes, label counts, the majority baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from student_trainer.data.readers import load_task
from student_trainer.data.tasks import get_task_spec
from student_trainer.train.evaluate import majority_baseline


def task_record(task: str, data: Mapping[str, Any], distill: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes as the runs see them (after ``max_train_samples``/``max_eval_samples``)."""
    options = {**distill, **data}
    train = load_task(task, data["data_dir"], "train", max_examples=options.get("max_train_samples"))
    split = get_task_spec(task).eval_split
    dev = load_task(task, data["data_dir"], split, max_examples=options.get("max_eval_samples"))
    train_labels = [e.label for e in train.examples]
    eval_labels = [e.label for e in dev.examples]
    return {
        "task": task,
        "metric": train.metric,
        "label_names": list(train.label_names),
        "train_size": len(train_labels),
        "eval_size": len(eval_labels),
        "train_label_counts": dict(sorted(Counter(train_labels).items())),
        "eval_label_counts": dict(sorted(Counter(eval_labels).items())),
        "majority_baseline": majority_baseline(
            train_labels, eval_labels, train.metric, list(train.label_names)
        ),
    }
