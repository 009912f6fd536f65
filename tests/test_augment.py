"""TinyBERT-style augmentation with a tiny random fill-mask model: counts, replacement rate, seeds, resume."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.commands import augment as augment_command
from student_trainer.data.augment import (
    WORD,
    Augmenter,
    AugmentSettings,
    WordVectors,
    augment_task,
    replace_words,
)
from student_trainer.data.readers import load_file
from student_trainer.data.tasks import Example, TaskData
from tests.tiny_models import save_tiny_mlm

SENTENCES = [
    "the movie was good and the acting was great .",
    "awful plot , boring story !",
    "i love this film , the music is fun",
    "a dull scene with a sad actor",
    "Great film",
    "best movie , worst plot",
]


@pytest.fixture(scope="module")
def mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mlm(tmp_path_factory.mktemp("mlm") / "mlm", seed=0)


@pytest.fixture(scope="module")
def augmenter(mlm: Path) -> Augmenter:
    return Augmenter.load(str(mlm), top_m=15, batch_size=8)


def task(n: int = len(SENTENCES)) -> TaskData:
    examples = [Example(SENTENCES[i % len(SENTENCES)], None, i % 2) for i in range(n)]
    return TaskData("toy", ["negative", "positive"], "accuracy", examples)


def settings(**changes) -> AugmentSettings:
    return AugmentSettings(
        **{"source": "toy", "model_name_or_path": "mlm", "num_aug": 4, "seed": 1, **changes}
    )


def test_candidates_are_whole_words_only_for_eligible_words(augmenter: Augmenter) -> None:
    per_text = augmenter.candidates(SENTENCES)
    for text, candidates in zip(SENTENCES, per_text, strict=True):
        words = [m.group() for m in WORD.finditer(text)]
        for index, options in candidates.items():
            assert words[index].isalpha() and words[index] not in (
                "the",
                "and",
                "was",
                "a",
                "with",
                "i",
                "is",
            )
            assert 1 <= len(options) <= 15 and len(set(options)) == len(options)
            assert all(o.isalpha() and o.lower() != words[index].lower() for o in options)
    assert per_text[4] and all(o[0].isupper() for o in per_text[4][0])  # "Great" -> capitalised candidates
    assert sum(len(c) for c in per_text) >= 15  # the MLM proposes something for most content words


def test_replaced_fraction_is_close_to_p(augmenter: Augmenter) -> None:
    rng = random.Random(0)
    per_text = augmenter.candidates(SENTENCES)
    changed = eligible = 0
    for text, candidates in zip(SENTENCES, per_text, strict=True):
        original = [m.group() for m in WORD.finditer(text)]
        for _ in range(300):
            copy = [m.group() for m in WORD.finditer(replace_words(text, candidates, rng, 0.4))]
            assert len(copy) == len(original)
            for index, (before, after) in enumerate(zip(original, copy, strict=True)):
                if index in candidates:
                    eligible += 1
                    changed += before != after
                else:
                    assert before == after  # stop words, punctuation, words without candidates stay
    assert eligible > 3000
    assert abs(changed / eligible - 0.4) < 0.03


def test_n_copies_per_sentence_deterministic_and_loadable(augmenter: Augmenter, tmp_path: Path) -> None:
    data = task()
    first, second, other_seed = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    counts = augment_task(data, first, augmenter, settings(), disable_tqdm=True)
    augment_task(data, second, augmenter, settings(), disable_tqdm=True)
    augment_task(data, other_seed, augmenter, settings(seed=2), disable_tqdm=True)
    assert counts == {"resumed_from": 0, "written": 6, "rows": 30}
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()

    loaded = load_file(first, text_columns=["sentence"], label_column="label", label_names=data.label_names)
    assert len(loaded) == 6 * 5
    for i, example in enumerate(data.examples):
        group = loaded.examples[i * 5 : (i + 1) * 5]
        assert group[0].text_a == example.text_a  # the original first, then N copies
        assert {e.label for e in group} == {example.label}
    assert sum(e.text_a not in SENTENCES for e in loaded.examples) > 10


def test_resume_after_an_interruption_writes_the_same_file(augmenter: Augmenter, tmp_path: Path) -> None:
    data = task(20)
    whole, resumed = tmp_path / "whole.tsv", tmp_path / "resumed.tsv"
    augment_task(data, whole, augmenter, settings(), chunk_sentences=4, disable_tqdm=True)
    augment_task(data, resumed, augmenter, settings(), chunk_sentences=4, disable_tqdm=True)
    lines = resumed.read_bytes().split(b"\n")
    resumed.write_bytes(b"\n".join(lines[:48]) + b"\n" + lines[48][:7])  # header + 47 rows + half a row
    counts = augment_task(data, resumed, augmenter, settings(), chunk_sentences=4, disable_tqdm=True)
    assert counts["resumed_from"] == 8  # 9 whole sentences written -> back to the chunk boundary at 8
    assert resumed.read_bytes() == whole.read_bytes()
    again = augment_task(data, resumed, augmenter, settings(), chunk_sentences=4, disable_tqdm=True)
    assert again["resumed_from"] == 20 and resumed.read_bytes() == whole.read_bytes()
    with pytest.raises(UserError, match=r"different settings \(num_aug\)"):
        augment_task(data, resumed, augmenter, settings(num_aug=3), disable_tqdm=True)


def test_word_vectors_cover_multi_piece_words(mlm: Path, tmp_path: Path) -> None:
    vectors = tmp_path / "glove.txt"
    vectors.write_text(
        "excellent 1 0 0\nsuperb 0.9 0.1 0\nsplendid 0.8 0.2 0\nthe 0.95 0 0\nterrible -1 0 0\n",
        encoding="utf-8",
    )
    augmenter = Augmenter.load(str(mlm), top_m=2, word_vectors=WordVectors.load(vectors))
    # "Excellent" is not in the tiny vocabulary (several word pieces): only the vectors can help.
    candidates = augmenter.candidates(["Excellent film"])[0]
    assert candidates[0] == ["Superb", "Splendid"]  # nearest first, stop word "the" skipped, case kept
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\nb 1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.txt, line 2"):
        WordVectors.load(bad)


def test_cli_on_a_pair_task(mlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rte = tmp_path / "RTE"
    rte.mkdir()
    rows = "index\tsentence1\tsentence2\tlabel\n0\tthe film was good\tthe movie was great\tentailment\n"
    (rte / "train.tsv").write_text(rows + "1\ta sad story\tit was fun\tnot_entailment\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    augment_command.register(parser.add_subparsers())
    out = tmp_path / "aug.tsv"
    argv = ["augment", "--model_name_or_path", str(mlm), "--task", "rte", "--data_dir", str(tmp_path)]
    args = parser.parse_args([*argv, "--output", str(out), "--num_aug", "3", "--disable_tqdm"])
    assert args.func(args) == 0
    assert "wrote 8 rows (2 sentences x 4)" in capsys.readouterr().out
    loaded = load_file(
        out, text_columns=["sentence1", "sentence2"], label_column="label", label_names=["e", "n"]
    )
    assert [e.label for e in loaded.examples] == [0] * 4 + [1] * 4 and loaded.is_pair
    bad = parser.parse_args([*argv, "--output", str(out), "--replace_prob", "1.5"])
    with pytest.raises(UserError, match="--replace_prob must be in"):
        bad.func(bad)
    with pytest.raises(UserError, match="not a fill-mask model|cannot load a fill-mask model"):
        Augmenter.load(str(tmp_path / "missing"))
