"""A loadable ``sentence[1,2]<TAB>label`` TSV writer (synthetic tasks and augmentation write it)."""

from __future__ import annotations

from pathlib import Path

from student_trainer.data.tasks import (
    Example,
    TaskData,
)


def write_tsv(data: TaskData, path: str | Path) -> Path:
    """Write ``sentence\tlabel`` (or ``sentence1\tsentence2\tlabel``) with a header, labels as indices.

    Unlabelled data gets no label column. Tabs and newlines inside texts become spaces, since the
    format has no quoting.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(tsv_header(data.is_pair, data.is_labelled))
        for example in data.examples:
            handle.write(tsv_line(example, data.is_labelled))
    return path


def tsv_header(pair: bool, labelled: bool = True) -> str:
    columns = ["sentence1", "sentence2"] if pair else ["sentence"]
    return "\t".join(columns + (["label"] if labelled else [])) + "\n"


def tsv_line(example: Example, labelled: bool = True) -> str:
    texts = [example.text_a] if example.text_b is None else [example.text_a, example.text_b]
    cells = [" ".join(text.split()) for text in texts] + ([str(example.label)] if labelled else [])
    return "\t".join(cells) + "\n"
