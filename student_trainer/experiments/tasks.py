"""What a task's data look like to the report: sizes, label counts, the majority baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from student_trainer.data.loading import load_train_and_eval
from student_trainer.train.evaluate import majority_baseline


def task_record(task: str, data: Mapping[str, Any], distill: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes as the runs see them (after ``max_train_samples``/``max_eval_samples``, and for a transfer
    set ``skip_train_samples``/``hide_train_labels``: hidden labels count as -1)."""
    options = {**distill, **data}
    train, dev = load_train_and_eval(
        task=task,
        data_dir=data["data_dir"],
        max_train_samples=options.get("max_train_samples"),
        max_eval_samples=options.get("max_eval_samples"),
        skip_train_samples=int(options.get("skip_train_samples") or 0),
        hide_train_labels=bool(options.get("hide_train_labels")),
    )
    assert dev is not None  # a registered task always has its evaluation split
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
