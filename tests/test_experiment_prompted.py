"""A grid whose teacher is a causal LM asked zero-shot (a prompt and label words), not fine-tuned: the
runner scores it on the dev set once, serves it with its prompt, and the student learns from it alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.errors import UserError
from student_trainer.experiments.config import parse_config
from tests.distill_support import REPO, save_student, write_sentences
from tests.tiny_families import save_tiny_causal_lm

pytestmark = pytest.mark.slow

PROMPTED = {
    "prompt": "review , {text} . it was",
    "label_words": {"negative": ["bad", "awful"], "positive": ["good"]},
}


def grid(root: Path, teacher: Path, student: Path, data: Path) -> Path:
    config = {
        "name": "prompted",
        "tasks": {"sst2": {"data_dir": str(data)}},
        "seeds": [1],
        "teachers": {"large": {"model": str(teacher), **PROMPTED, "max_seq_length": 64}},
        "student": {"model": str(student), "num_layers": 1},
        "distill": {
            "max_seq_length": 16,
            "learning_rate": 1e-3,
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 1,
            "hide_train_labels": True,
            "skip_train_samples": 8,
        },  # fmt: skip
        "server": {"batch_invariant": True},
        "methods": [{"name": "entropy-r0.5", "args": {"data_selection": "entropy", "selection_ratio": 0.5}}],
        "tables": [{"title": "prompted", "methods": ["entropy-r0.5"]}],
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_prompted_teacher_is_scored_served_and_teaches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_sentences(data / "train.tsv", 40, seed=1)
    write_sentences(data / "dev.tsv", 24, seed=2)
    teacher = save_tiny_causal_lm("llama", tmp_path / "lm")
    config = grid(tmp_path, teacher, save_student(tmp_path / "student"), data)
    argv = [sys.executable, "-m", "student_trainer.cli", "experiment", "--config", str(config),
            "--results_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work"),
            "--teachers_dir", str(tmp_path / "teachers")]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = tmp_path / "results" / "default" / "prompted"
    record = json.loads((results / "teachers" / "sst2-large.json").read_text())
    assert record["prompted"] == PROMPTED and 0.0 <= record["eval"]["eval_accuracy"] <= 1.0
    served = yaml.safe_load(
        (tmp_path / "work" / "default" / "prompted" / "service" / "sst2" / "teachers.yaml").read_text()
    )
    assert served["teachers"][0]["prompt"] == PROMPTED["prompt"] and not (tmp_path / "teachers").exists()
    run = json.loads(next(results.rglob("results.json")).read_text())
    assert run["flops"]["teacher_flops_spent"] > 0 and run["eval"]["eval_accuracy"] >= 0

    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "scoring the prompted" not in again.stdout, again.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 1e-4}, "a prompted teacher is not fine-tuned; unknown keys ['learning_rate']"),
        ({"label_words": {"only": ["x"]}}, "label_words must map at least two classes"),
    ],
)
def test_a_wrong_prompted_teacher_fails_in_one_line(change: dict, message: str) -> None:
    raw = {"name": "x", "tasks": {"sst2": {"data_dir": "d"}}, "seeds": [1], "student": {"model": "m"},
           "teachers": {"large": {"model": "lm", **PROMPTED, **change}},
           "methods": [{"name": "kd", "args": {}}]}  # fmt: skip
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)
