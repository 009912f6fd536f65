"""File readers: GLUE-format task files, generic CSV/TSV/JSONL, Hugging Face ``datasets``.

Every loader returns a :class:`TaskData` (texts + integer labels + label names + metric). GLUE TSV
files are read with **no quote handling** (fields may start with ``"``); MRPC files start with a
UTF-8 BOM; CoLA train/dev have no header. A malformed row raises :class:`UserError` naming the
file and line, or is skipped and counted with ``skip_bad_rows``; a file that cannot be read at all
(not UTF-8, a broken ``.gz``, CSV a stray quote makes unparseable) is always a :class:`UserError`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import UserError
from student_trainer.data.tasks import (
    UNLABELLED,
    Example,
    FileFormat,
    TaskData,
    get_task_spec,
    task_file,
)
from student_trainer.train.metrics import METRICS


@dataclass
class _Row:
    """One parsed line: its texts and raw label, or why it cannot become an Example."""

    line_no: int
    texts: list[str] = field(default_factory=list)
    raw_label: str | None = None
    problem: str | None = None


def _read_lines(path: Path, encoding: str) -> Iterator[str]:
    """The lines of ``path`` (``.gz`` too), decoded one at a time so a bad byte is named by its line."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line_no = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            for raw in handle:
                line_no += 1
                yield decoder.decode(raw)
            decoder.decode(b"", final=True)  # a multi-byte character cut off at the end of the file
    except UnicodeDecodeError as err:
        wanted = encoding.upper().removesuffix("-SIG")
        raise UserError(
            f"{path}, line {line_no}: not {wanted} text (byte {err.object[err.start]:#04x}: {err.reason}); "
            f"save the file as {wanted}"
        ) from err
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read it ({err})") from err


def _split_lines(
    path: Path, *, delimiter: str, quoting: bool, encoding: str
) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of every non-blank record; without quoting a record is one line."""
    lines = _read_lines(path, encoding)
    if not quoting:
        for line_no, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield line_no, line.split(delimiter)
        return
    reader = csv.reader(lines, delimiter=delimiter)
    start = 1
    while True:
        try:
            fields = next(reader, None)
        except csv.Error as err:  # it cannot find where the next record starts: nothing to skip to
            raise UserError(f"{path}, line {start}: malformed CSV ({err}); is a quote left open?") from err
        if fields is None:
            return
        if fields:
            yield start, fields
        start = reader.line_num + 1


def _column_indices(columns: Sequence[str | int], header: list[str] | None, path: Path) -> list[int]:
    indices = []
    for column in columns:
        if isinstance(column, int) or (header is None and str(column).isdigit()):
            indices.append(int(column))
        elif header is not None and column in header:
            indices.append(header.index(column))
        else:
            have = f"the header has {header}" if header is not None else "the file has no header"
            raise UserError(f"{path}: no column {column!r}; {have}")
    return indices


def _delimited_rows(path: Path, fmt: FileFormat, *, delimiter: str, quoting: bool) -> Iterator[_Row]:
    lines = _split_lines(path, delimiter=delimiter, quoting=quoting, encoding=fmt.encoding)
    header: list[str] | None = None
    expected = fmt.num_columns
    if fmt.header:
        first = next(lines, None)
        if first is None:
            raise UserError(f"{path}: empty file")
        header = [column.strip() for column in first[1]]
        expected = len(header)
    text_idx = _column_indices(fmt.text_columns, header, path)
    label_idx = None if fmt.label_column is None else _column_indices([fmt.label_column], header, path)[0]
    needed = max([*text_idx, label_idx or 0]) + 1
    for line_no, fields in lines:
        if (expected is not None and len(fields) != expected) or len(fields) < needed:
            problem = f"expected {expected or needed} columns, found {len(fields)}"
            if any("\n" in f for f in fields):
                problem += " (a field runs over several lines: an unclosed quote?)"
            yield _Row(line_no, problem=problem)
            continue
        raw_label = None if label_idx is None else fields[label_idx]
        yield _Row(line_no, [fields[i] for i in text_idx], raw_label)


def _cell_text(value: object) -> str | None:
    """A JSON / dataset value as text: a string as it is, a number or boolean as Python writes it
    (``True``/``False`` labels, as a bool column of a hub dataset gives), anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):  # bool is an int
        return str(value)
    return None


def _record_row(line_no: int, record: object, text_columns: Sequence[str], label_column: str | None) -> _Row:
    """One JSON object or dataset record -> a row; null, lists and objects are bad rows, not "None"."""
    wanted = [*text_columns, *([label_column] if label_column is not None else [])]
    missing = [c for c in wanted if not isinstance(record, dict) or c not in record]
    if missing or not isinstance(record, dict):
        return _Row(line_no, problem=f"missing field(s) {missing}")
    cells: list[str] = []
    for column in wanted:
        cell = _cell_text(record[column])
        if cell is None:
            shown = json.dumps(record[column], default=repr)[:60]
            return _Row(line_no, problem=f"field {column!r} must be a string or a number, got {shown}")
        cells.append(cell)
    texts, labels = cells[: len(text_columns)], cells[len(text_columns) :]
    return _Row(line_no, texts, labels[0] if labels else None)


def _jsonl_rows(path: Path, text_columns: Sequence[str], label_column: str | None) -> Iterator[_Row]:
    for line_no, line in enumerate(_read_lines(path, "utf-8-sig"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield _Row(line_no, problem=f"invalid JSON ({err.msg})")
            continue
        yield _record_row(line_no, record, text_columns, label_column)


def _label_lookup(raw_values: Sequence[str]) -> dict[str, int]:
    """A label may be written as its raw value / name or as its integer index."""
    lookup = {str(i): i for i in range(len(raw_values))}
    lookup.update({value: i for i, value in enumerate(raw_values)})
    return lookup


def infer_label_names(raw_labels: Sequence[str]) -> list[str]:
    """Integers become ``"0".."K-1"`` (K = largest + 1); anything else the sorted distinct strings."""
    distinct = sorted({raw.strip() for raw in raw_labels})
    if distinct and all(raw.isdigit() for raw in distinct):
        return [str(i) for i in range(max(int(raw) for raw in distinct) + 1)]
    return distinct


def _collect(
    rows: Iterator[_Row],
    path: Path,
    *,
    name: str,
    label_names: Sequence[str] | None,
    raw_labels: Sequence[str] | None,
    labelled: bool,
    metric: str,
    skip_bad_rows: bool,
    max_examples: int | None,
) -> TaskData:
    """Rows -> Examples: map labels, reject bad rows (or skip and count them, warning once)."""
    if labelled and label_names is None:
        rows_list = list(rows)
        label_names = infer_label_names([r.raw_label for r in rows_list if r.problem is None and r.raw_label])
        rows = iter(rows_list)
    label_names = list(label_names or [])
    lookup = _label_lookup(raw_labels or label_names)
    examples: list[Example] = []
    skipped, first_problem = 0, ""
    for row in rows:
        if max_examples is not None and len(examples) >= max_examples:
            break
        problem = row.problem
        if problem is None and any(not text.strip() for text in row.texts):
            problem = "empty text"
        label = UNLABELLED
        if problem is None and labelled:
            label = lookup.get((row.raw_label or "").strip(), UNLABELLED)
            if label == UNLABELLED:
                problem = (
                    f"unknown label {row.raw_label!r} (expected one of {list(raw_labels or label_names)})"
                )
        if problem is not None:
            if not skip_bad_rows:
                raise UserError(
                    f"{path}, line {row.line_no}: {problem} (pass --skip_bad_rows to skip such rows)"
                )
            skipped += 1
            first_problem = first_problem or f"line {row.line_no}: {problem}"
            continue
        examples.append(Example(row.texts[0], row.texts[1] if len(row.texts) > 1 else None, label))
    if skipped:
        warnings.warn(f"skipped {skipped} malformed row(s) in {path} (first: {first_problem})", stacklevel=3)
    if not examples:
        raise UserError(f"{path}: no usable rows")
    return TaskData(name, label_names, metric, examples, skipped)


def load_task(
    task: str,
    data_dir: str | Path,
    split: str = "train",
    *,
    skip_bad_rows: bool = False,
    max_examples: int | None = None,
) -> TaskData:
    """Load one split of a registered task (see :data:`TASKS`) from ``data_dir``."""
    spec = get_task_spec(task)
    path, fmt = task_file(spec, data_dir, split)
    return _collect(
        _delimited_rows(path, fmt, delimiter="\t", quoting=False),
        path,
        name=spec.name,
        label_names=spec.label_names,
        raw_labels=spec.raw_labels,
        labelled=fmt.label_column is not None,
        metric=spec.metric,
        skip_bad_rows=skip_bad_rows,
        max_examples=max_examples,
    )


def load_file(
    path: str | Path,
    *,
    text_columns: Sequence[str | int],
    label_column: str | int | None,
    label_names: Sequence[str] | None = None,
    skip_bad_rows: bool = False,
    max_examples: int | None = None,
    metric: str = "accuracy",
    header: bool = True,
) -> TaskData:
    """Load a CSV, TSV or JSONL file (``.gz`` too, chosen by extension) with a column mapping.

    ``text_columns`` names one column (single sentence) or two (a pair); without a header
    (``header=False``) columns are 0-based positions. Labels may be written as names from
    ``label_names`` or as integer indices; without ``label_names`` they are inferred (see
    :func:`infer_label_names`). CSV honours quotes; TSV has none (GLUE style).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    if not 1 <= len(text_columns) <= 2:
        raise UserError(f"text_columns must name one or two columns, got {list(text_columns)}")
    if metric not in METRICS:
        raise UserError(f"metric {metric!r} is not one of {list(METRICS)}")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        label = None if label_column is None else str(label_column)
        rows = _jsonl_rows(path, [str(c) for c in text_columns], label)
    elif kind in (".csv", ".tsv"):
        fmt = FileFormat(tuple(text_columns), label_column, header=header, encoding="utf-8-sig")
        rows = _delimited_rows(path, fmt, delimiter="," if kind == ".csv" else "\t", quoting=kind == ".csv")
    else:
        raise UserError(f"{path}: unsupported file type {kind or '(none)'!r}; use .csv, .tsv or .jsonl")
    return _collect(
        rows,
        path,
        name=path.name,
        label_names=label_names,
        raw_labels=None,
        labelled=label_column is not None,
        metric=metric,
        skip_bad_rows=skip_bad_rows,
        max_examples=max_examples,
    )


def _datasets_module():
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as err:
        raise UserError(
            "loading hub datasets needs the `datasets` package: pip install 'dynamic-kd-service[datasets]'"
        ) from err
    return datasets


def hf_split_names(name: str, config: str | None = None) -> list[str]:
    """The splits of a ``datasets`` dataset: a folder written by ``save_to_disk``, or a hub id/script."""
    datasets = _datasets_module()
    try:
        if Path(name).is_dir() and not any(Path(name).glob("*.py")):
            saved = datasets.load_from_disk(name)
            return list(saved.keys()) if hasattr(saved, "keys") else ["train"]
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as err:  # the hub raises many types: network, missing config, bad folder
        raise UserError(f"cannot list the splits of dataset {name!r} ({config}): {err}") from err


def load_hf_dataset(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_columns: Sequence[str],
    label_column: str | None,
    label_names: Sequence[str] | None = None,
    metric: str = "accuracy",
    max_examples: int | None = None,
) -> TaskData:
    """Load a split of a Hugging Face ``datasets`` dataset (needs the optional package): a hub id or
    loading script through ``load_dataset``, or a folder written by ``save_to_disk``."""
    datasets = _datasets_module()
    try:
        if Path(name).is_dir() and not any(Path(name).glob("*.py")):
            dataset = datasets.load_from_disk(name)
            dataset = dataset[split] if hasattr(dataset, "keys") else dataset
        else:
            dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types: network, missing split, bad config
        raise UserError(f"cannot load dataset {name!r} ({config}, {split}): {err}") from err
    if label_column is not None and label_names is None:
        feature = dataset.features.get(label_column)
        label_names = list(feature.names) if hasattr(feature, "names") else None
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    rows = (_record_row(i + 1, record, text_columns, label_column) for i, record in enumerate(dataset))
    labelled = label_column is not None
    return _collect(
        rows,
        Path(f"{name}/{config or ''}/{split}"),
        name=name,
        label_names=label_names,
        raw_labels=None,
        labelled=labelled,
        metric=metric,
        skip_bad_rows=False,
        max_examples=None,
    )
