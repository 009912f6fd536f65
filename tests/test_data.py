"""Loaders on the real GLUE files (counts from ../shared/data/MANIFEST.md), malformed files, batching."""

from __future__ import annotations

import gzip
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.args.distill import parse_distill_args
from student_trainer.data.loading import load_train_and_eval, load_train_and_eval_from
from student_trainer.data.readers import load_file, load_hf_dataset, load_task
from student_trainer.data.tasks import TASKS, Example, TaskData
from student_trainer.data.tokenized import TokenizedDataset, collate_batch
from student_trainer.data.tsv import write_tsv
from tests.tiny_models import save_tiny_tokenizer

# (task, split) -> label counts as listed in the MANIFEST (unlabelled test files: {-1: rows}).
MANIFEST_COUNTS = {
    ("sst2", "train"): {0: 29_780, 1: 37_569},
    ("sst2", "dev"): {0: 428, 1: 444},
    ("sst2", "test"): {-1: 1_821},
    ("cola", "train"): {1: 6_023, 0: 2_528},
    ("cola", "dev"): {1: 721, 0: 322},
    ("cola", "test"): {-1: 1_063},
    ("mrpc", "train"): {0: 1_194, 1: 2_474},
    ("mrpc", "dev"): {0: 129, 1: 279},
    ("mrpc", "test"): {-1: 1_725},
    ("mrpc", "msr_train"): {0: 1_323, 1: 2_753},
    ("mrpc", "msr_test"): {0: 578, 1: 1_147},
    ("rte", "train"): {0: 1_249, 1: 1_241},  # 0 = entailment
    ("rte", "dev"): {0: 146, 1: 131},
    ("rte", "test"): {-1: 3_000},
    ("sst5", "train"): {0: 1_092, 1: 2_218, 2: 1_624, 3: 2_322, 4: 1_288},
    ("sst5", "dev"): {0: 139, 1: 289, 2: 229, 3: 279, 4: 165},
    ("sst5", "test"): {0: 279, 1: 633, 2: 389, 3: 510, 4: 399},
    ("imdb", "train"): {0: 12_500, 1: 12_500},
    ("imdb", "test"): {0: 12_500, 1: 12_500},
}


@pytest.mark.parametrize(("task", "split"), list(MANIFEST_COUNTS))
def test_real_files_match_manifest(reference_data: Path, task: str, split: str) -> None:
    data = load_task(task, reference_data, split)
    assert dict(Counter(e.label for e in data.examples)) == MANIFEST_COUNTS[(task, split)]
    assert data.skipped_rows == 0
    assert data.label_names == list(TASKS[task].label_names)
    assert all(e.text_a.strip() for e in data.examples)
    assert data.is_pair == (task in ("mrpc", "rte"))


def test_real_fields_keep_leading_quotes_and_bom_is_stripped(reference_data: Path) -> None:
    # MRPC dev row 1's second sentence starts with '"' (CSV quoting would merge rows); the header
    # starts with a BOM, so 'Quality' is only found with utf-8-sig.
    mrpc = load_task("mrpc", reference_data / "mrpc", "dev")  # a task folder works as data_dir too
    assert mrpc.examples[0] == Example(
        "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
        '"The foodservice pie business does not fit our long-term growth strategy.',
        1,
    )
    cola = load_task("cola", reference_data, "dev")
    assert cola.examples[-1].text_a and cola.metric == "mcc"  # last line has no newline
    assert (
        load_task("imdb", reference_data, "train", max_examples=3)
        .examples[0]
        .text_a.startswith("Story of a man")
    )


def test_registry_metrics_and_unknown_names(tmp_path: Path) -> None:
    assert {t: TASKS[t].metric for t in ("mrpc", "qqp", "cola", "sst2")} == {
        "mrpc": "f1",
        "qqp": "f1",
        "cola": "mcc",
        "sst2": "accuracy",
    }
    assert TASKS["mnli"].eval_split == "dev_matched"
    with pytest.raises(UserError, match="unknown task 'nope'"):
        load_task("nope", tmp_path)
    with pytest.raises(UserError, match="has no split 'dev'"):
        load_task("mnli", tmp_path, "dev")
    with pytest.raises(UserError, match="no sst2 train file"):
        load_task("sst2", tmp_path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_layouts_for_tasks_without_reference_files(tmp_path: Path) -> None:
    mnli = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    _write(
        tmp_path / "MNLI" / "dev_matched.tsv",
        mnli + "0\t1\t1\tx\tA man runs.\tA man moves.\tentailment\tentailment\n",
    )
    data = load_task("mnli", tmp_path, "dev_matched")
    assert data.examples == [Example("A man runs.", "A man moves.", 0)]
    qqp = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    _write(tmp_path / "qqp" / "train.tsv", qqp + "0\t1\t2\tHow?\tWhy?\t0\n1\t3\t4\tWho?\tWho is?\t1\n")
    assert [e.label for e in load_task("qqp", tmp_path).examples] == [0, 1]
    _write(tmp_path / "QNLI" / "test.tsv", "index\tquestion\tsentence\n0\tWhat?\tThat.\n")
    assert load_task("qnli", tmp_path, "test").examples == [Example("What?", "That.", -1)]


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\nfine\t1\n")
    with pytest.raises(UserError, match=r"train\.tsv, line 3: expected 2 columns, found 3"):
        load_task("sst2", tmp_path)
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 3: unknown label 'maybe'"):
        load_task("sst2", tmp_path)
    path.write_text("sentence\tlabel\n \t1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: empty text"):
        load_task("sst2", tmp_path)


def test_skip_bad_rows_counts_and_warns_once(tmp_path: Path) -> None:
    rows = "sentence\tlabel\ngood\t1\nbad\tfilm\t0\nok\t7\n\t0\nawful\t0\n"
    _write(tmp_path / "train.tsv", rows)
    with pytest.warns(UserWarning, match=r"skipped 3 malformed row\(s\).*line 3") as record:
        data = load_task("sst2", tmp_path, skip_bad_rows=True)
    assert len(record) == 1
    assert data.skipped_rows == 3
    assert [(e.text_a, e.label) for e in data.examples] == [("good", 1), ("awful", 0)]


def test_headerless_cola_and_no_quote_handling(tmp_path: Path) -> None:
    _write(
        tmp_path / "CoLA" / "train.tsv", 'gj04\t1\t\t"Quoted, start.\nab12\t0\t*\tBad "half quote\nx\t1\t\tok'
    )
    data = load_task("cola", tmp_path)
    assert [(e.text_a, e.label) for e in data.examples] == [
        ('"Quoted, start.', 1),
        ('Bad "half quote', 0),
        ("ok", 1),
    ]
    _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\tJust three columns\n")
    with pytest.raises(UserError, match=r"dev\.tsv, line 1: expected 4 columns, found 3"):
        load_task("cola", tmp_path, "dev")


def test_load_file_csv_tsv_jsonl_gz(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "a.csv", 'id,review,stars\n1,"good, really",pos\n2,"bad ""film""",neg\n')
    data = load_file(csv_path, text_columns=["review"], label_column="stars")
    assert data.label_names == ["neg", "pos"]  # inferred: sorted strings
    assert [(e.text_a, e.label) for e in data.examples] == [("good, really", 1), ('bad "film"', 0)]
    labelled = load_file(csv_path, text_columns=["review"], label_column="stars", label_names=["pos", "neg"])
    assert [e.label for e in labelled.examples] == [0, 1]

    jsonl = tmp_path / "p.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as handle:
        for record in ({"q": "a", "s": "b", "y": 2}, {"q": "c", "s": "d", "y": 0}):
            handle.write(json.dumps(record) + "\n")
    pairs = load_file(jsonl, text_columns=["q", "s"], label_column="y")
    assert pairs.label_names == ["0", "1", "2"]  # integers 0..max
    assert pairs.examples == [Example("a", "b", 2), Example("c", "d", 0)]

    tsv = _write(tmp_path / "t.tsv", 'text\n"unquoted\n')
    assert load_file(tsv, text_columns=["text"], label_column=None).examples == [
        Example('"unquoted', None, -1)
    ]


def test_load_file_errors(tmp_path: Path) -> None:
    bad_json = _write(tmp_path / "x.jsonl", '{"t": "a", "y": 1}\n{oops\n{"t": "b"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl, line 2: invalid JSON"):
        load_file(bad_json, text_columns=["t"], label_column="y")
    with pytest.warns(
        UserWarning, match=r"skipped 2 malformed row\(s\) in .*x\.jsonl \(first: line 2: invalid"
    ):
        data = load_file(
            bad_json, text_columns=["t"], label_column="y", label_names=["no", "yes"], skip_bad_rows=True
        )
    assert data.skipped_rows == 2 and data.examples == [Example("a", None, 1)]
    with pytest.raises(UserError, match=r"no column 'text'; the header has \['t', 'y'\]"):
        load_file(_write(tmp_path / "y.tsv", "t\ty\na\t1\n"), text_columns=["text"], label_column="y")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_file(_write(tmp_path / "z.txt", "a\n"), text_columns=["a"], label_column=None)
    with pytest.raises(UserError, match="no such file"):
        load_file(tmp_path / "missing.csv", text_columns=["a"], label_column=None)


def test_hf_datasets_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(UserError, match="needs the `datasets` package"):
        load_hf_dataset("glue", config="sst2", text_columns=["sentence"], label_column="label")


def test_write_tsv_round_trips_through_the_loaders(tmp_path: Path) -> None:
    single = TaskData(
        "s",
        ["negative", "positive"],
        "accuracy",
        [Example("a\tgood\nfilm", None, 1), Example("bad", None, 0)],
    )
    write_tsv(single, tmp_path / "train.tsv")
    assert [(e.text_a, e.label) for e in load_task("sst2", tmp_path).examples] == [
        ("a good film", 1),
        ("bad", 0),
    ]
    pair = TaskData("p", ["x", "y", "z"], "accuracy", [Example("q", "s", 2)])
    path = write_tsv(pair, tmp_path / "pair.tsv")
    loaded = load_file(
        path, text_columns=["sentence1", "sentence2"], label_column="label", label_names=["x", "y", "z"]
    )
    assert loaded.examples == pair.examples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenized_dataset_and_dynamic_padding(tokenizer) -> None:
    data = TaskData(
        "p",
        ["no", "yes"],
        "accuracy",
        [Example("good film", "it is", 1), Example("bad", "a very very long one that gets cut", 0)],
    )
    dataset = TokenizedDataset(data, tokenizer, max_seq_length=8)
    assert len(dataset) == 2 and [len(ids) for ids in dataset.input_ids] == [
        7,
        8,
    ]  # [CLS] good film [SEP] it is [SEP]; truncated
    item = dataset[1]
    assert item["label"] == 0 and item["index"] == 1  # the row's text, for a teacher with its own vocabulary
    batch = collate_batch([dataset[0], dataset[1]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, 7].item() == tokenizer.pad_token_id
    assert batch["attention_mask"].sum(dim=1).tolist() == [7, 8]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    assert tokenizer.decode(batch["input_ids"][0, :4]) == "[CLS] good film [SEP]"
    single = collate_batch([dataset[0]], pad_token_id=tokenizer.pad_token_id)
    assert single["input_ids"].shape == (1, 7)  # pads only to the longest in the batch


def test_load_train_and_eval_follows_the_cli_options(tmp_path: Path) -> None:
    (tmp_path / "imdb").mkdir()
    with gzip.open(tmp_path / "imdb" / "train.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("id\trating\tlabel\ttext\ntrain/neg/0_3\t3\t0\tdull\ntrain/pos/1_9\t9\t1\tfun\n")
    (tmp_path / "imdb" / "test.tsv.gz").write_bytes((tmp_path / "imdb" / "train.tsv.gz").read_bytes())
    train, evaluation = load_train_and_eval(task="imdb", data_dir=tmp_path, max_eval_samples=1)
    assert len(train) == 2 and evaluation is not None and len(evaluation) == 1  # IMDB evaluates on test

    first = _write(tmp_path / "t.tsv", "q\ts\ty\na\tb\tyes\nc\td\tno\n")
    second = _write(tmp_path / "v.tsv", "q\ts\ty\ne\tf\tyes\n")
    train, evaluation = load_train_and_eval(
        train_file=first, validation_file=second, text_columns="q, s", label_column="y"
    )
    assert train.label_names == ["no", "yes"] and evaluation is not None
    assert evaluation.examples == [Example("e", "f", 1)]  # labels mapped with the training names
    assert load_train_and_eval(train_file=first, text_columns=["q"], label_column="y")[1] is None
    with pytest.raises(UserError, match="give either --task"):
        load_train_and_eval(task="sst2", data_dir=tmp_path, train_file=first)
    with pytest.raises(UserError, match="--task needs --data_dir"):
        load_train_and_eval(task="sst2")


@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_unreadable_files_are_one_line_errors_even_when_skipping_rows(
    tmp_path: Path, skip_bad_rows: bool
) -> None:
    def load(path: Path) -> object:
        return load_file(path, text_columns=["sentence"], label_column="label", skip_bad_rows=skip_bad_rows)

    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("sentence\tlabel\ngood movie\t1\ncafé bad\t0\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.tsv, line 3: not UTF-8 text \(byte 0xe9"):
        load(latin1)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_bytes(latin1.read_bytes())  # the GLUE loader reads the same way
    with pytest.raises(UserError, match=r"train\.tsv, line 3: not UTF-8 text"):
        load_task("sst2", tmp_path, skip_bad_rows=skip_bad_rows)
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_bytes(b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n')
    with pytest.raises(UserError, match=r"l\.jsonl, line 2: not UTF-8 text"):
        load(jsonl)

    not_gzip = tmp_path / "broken.tsv.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"broken\.tsv\.gz: cannot read it \(Not a gzipped file"):
        load(not_gzip)
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(gzip.compress(b"sentence\tlabel\n" + b"good film\t1\n" * 100)[:-12])
    with pytest.raises(UserError, match=r"cut\.tsv\.gz: cannot read it"):
        load(truncated)

    # one quote left open swallows the rest of the file into one field, past csv's field limit
    stray = _write(
        tmp_path / "strayquote.csv",
        'sentence,label\n"this opens a quote and never closes it,1\n'
        + "".join(f"movie number {i} was good,{i % 2}\n" for i in range(6000)),
    )
    with pytest.raises(UserError, match=r"strayquote\.csv, line 2: malformed CSV \(field larger than"):
        load(stray)


def test_an_unclosed_quote_in_a_small_csv_is_a_bad_row_at_the_line_it_opens(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.csv", 'sentence,label\ngood,1\n"opens here,0\nbad,0\n')
    with pytest.raises(UserError, match=r"q\.csv, line 3: expected 2 columns, found 1 \(.*unclosed quote"):
        load_file(path, text_columns=["sentence"], label_column="label")


def test_json_texts_must_be_strings(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "null.jsonl",
        '{"sentence": null, "label": 1}\n{"sentence": ["good", "movie"], "label": 0}\n'
        '{"sentence": "fine", "label": 1}\n{"sentence": 42, "label": 0}\n'
        '{"sentence": "meh", "label": null}\n',
    )
    with pytest.raises(
        UserError, match=r"null\.jsonl, line 1: field 'sentence' must be a string or a number, got null"
    ):
        load_file(path, text_columns=["sentence"], label_column="label")
    with pytest.warns(UserWarning, match=r"skipped 3 malformed row\(s\).*first: line 1: field 'sentence'"):
        data = load_file(path, text_columns=["sentence"], label_column="label", skip_bad_rows=True)
    assert data.examples == [Example("fine", None, 1), Example("42", None, 0)]  # a number is its text
    assert data.skipped_rows == 3 and data.label_names == ["0", "1"]
    path.write_text('{"sentence": "a", "label": 1}\n{"sentence": ["a", "b"], "label": 0}\n', encoding="utf-8")
    with pytest.raises(
        UserError, match=r"line 2: field 'sentence' must be a string or a number, got \[\"a\", \"b\"\]"
    ):
        load_file(path, text_columns=["sentence"], label_column="label")


def test_json_boolean_labels_load_as_true_and_false(tmp_path: Path) -> None:
    """A boolean label (BoolQ's answer, a hub bool column) is a label, not a bad row."""
    rows = "".join(json.dumps({"sentence": f"s{i}", "label": i % 2 == 0}) + "\n" for i in range(4))
    data = load_file(_write(tmp_path / "bool.jsonl", rows), text_columns=["sentence"], label_column="label")
    assert data.label_names == ["False", "True"] and [e.label for e in data.examples] == [1, 0, 1, 0]


def test_hub_records_are_checked_like_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    class Rows(list):
        features: dict = {}

    rows = Rows([{"sentence": "good", "label": 1}, {"sentence": None, "label": 0}])
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(UserError, match=r"line 2: field 'sentence' must be a string or a number, got null"):
        load_hf_dataset("fake", text_columns=["sentence"], label_column="label", label_names=["n", "p"])
    with pytest.raises(UserError, match=r"line 1: missing field\(s\) \['text'\]"):
        load_hf_dataset("fake", text_columns=["text"], label_column="label", label_names=["n", "p"])


def test_training_data_needs_two_distinct_labels(tmp_path: Path) -> None:
    one = _write(tmp_path / "onelabel.tsv", "sentence\tlabel\ngood movie\tpos\nfine film\tpos\n")
    with pytest.raises(UserError, match=r"onelabel\.tsv: the training data has 1 distinct label \('pos'\)"):
        load_train_and_eval(train_file=one)
    _write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood\t1\nfine\t1\n")
    _write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nbad\t0\n")  # one label is fine for evaluation
    with pytest.raises(
        UserError, match=r"has 1 distinct label \('positive'\); a classifier needs at least 2"
    ):
        load_train_and_eval(task="sst2", data_dir=tmp_path)
    _write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    train, evaluation = load_train_and_eval(task="sst2", data_dir=tmp_path)
    assert len(train) == 2 and evaluation is not None and len(evaluation) == 1


def test_metric_option_replaces_the_default_of_files(tmp_path: Path) -> None:
    """An augmented CoLA file still wants MCC: ``--metric`` says so for train and eval."""
    rows = "sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(6))
    (tmp_path / "train.tsv").write_text(rows)
    (tmp_path / "dev.tsv").write_text(rows)
    files = {"train_file": tmp_path / "train.tsv", "validation_file": tmp_path / "dev.tsv"}
    train, evaluation = load_train_and_eval(**files)
    assert train.metric == evaluation.metric == "accuracy"
    train, evaluation = load_train_and_eval(**files, metric="mcc")
    assert train.metric == evaluation.metric == "mcc"
    (tmp_path / "three.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 3}\n" for i in range(6)))
    with pytest.raises(UserError, match="--metric f1 is binary F1, but the data has 3 labels"):
        load_train_and_eval(train_file=tmp_path / "three.tsv", metric="f1")
    argv = ["--train_file", str(files["train_file"]), "--metric", "mcc", "--no_kd", "--output_dir", "o"]
    args = parse_distill_args([*argv, "--model_name_or_path", "unused"])
    assert load_train_and_eval_from(args)[0].metric == "mcc"


def _save_dataset(path: Path, splits: dict[str, list[tuple[str, int]]]) -> Path:
    """A ``datasets`` DatasetDict written with ``save_to_disk`` (no network), labels as a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}, features=features
            )
            for split, rows in splits.items()
        }
    ).save_to_disk(str(path))
    return path


def test_dataset_name_trains_on_train_and_evaluates_on_validation(tmp_path: Path) -> None:
    path = _save_dataset(
        tmp_path / "saved",
        {"train": [("good film", 1), ("dull plot", 0), ("fun", 1)], "validation": [("bad", 0), ("great", 1)]},
    )
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--no_kd"]
    args = parse_distill_args([*argv, "--dataset_name", str(path), "--max_eval_samples", "1"])
    train, evaluation = load_train_and_eval_from(args)
    assert train.label_names == ["neg", "pos"] and train.metric == "accuracy"
    assert [(e.text_a, e.label) for e in train.examples] == [("good film", 1), ("dull plot", 0), ("fun", 1)]
    assert evaluation is not None and [(e.text_a, e.label) for e in evaluation.examples] == [("bad", 0)]
    only_train = _save_dataset(tmp_path / "only_train", {"train": [("good", 1), ("bad", 0)]})
    assert load_train_and_eval(dataset_name=str(only_train))[1] is None
    with pytest.raises(UserError, match="give either --task"):
        parse_distill_args([*argv, "--dataset_name", str(path), "--train_file", "t.tsv"])
    with pytest.raises(UserError, match=r"cannot load dataset .*missing"):
        load_train_and_eval(dataset_name=str(tmp_path / "missing"), dataset_config="x")
