"""KD on a transfer set: training rows whose labels are hidden (the teacher is the only supervision),
taken past the rows the teacher was fine-tuned on, evaluated on the labelled dev set as usual."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import UserError
from student_trainer.data.loading import load_train_and_eval
from student_trainer.data.tasks import UNLABELLED
from tests.distill_support import (
    distill_argv,
    run_cli,
    run_in_process,
    save_student,
    train_log,
    write_sentences,
)


def relabelled(source: Path, target: Path, *, flip: bool = False, scramble_first: int = 0) -> Path:
    """``source`` with every label flipped and/or the first rows' texts replaced."""
    header, *rows = source.read_text().splitlines()
    lines = [header]
    for i, row in enumerate(rows):
        text, label = row.split("\t")
        lines.append(
            f"{'great awful film' if i < scramble_first else text}\t{1 - int(label) if flip else label}"
        )
    target.write_text("\n".join(lines) + "\n")
    return target


def test_the_loader_skips_rows_and_hides_labels(tmp_path: Path) -> None:
    train = write_sentences(tmp_path / "train.tsv", 20, seed=1)
    full, _ = load_train_and_eval(train_file=train)
    transfer, _ = load_train_and_eval(
        train_file=train, skip_train_samples=5, max_train_samples=10, hide_train_labels=True
    )
    assert [e.text_a for e in transfer.examples] == [e.text_a for e in full.examples[5:15]]
    assert {e.label for e in transfer.examples} == {UNLABELLED} and not transfer.is_labelled
    assert transfer.label_names == full.label_names
    with pytest.raises(UserError, match="--skip_train_samples 20: the training data has only 20 rows"):
        load_train_and_eval(train_file=train, skip_train_samples=20)


def test_hidden_labels_add_no_cross_entropy() -> None:
    from student_trainer.kd.objective import F  # the objective's own cross-entropy, checked by hand

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]])
    labels = torch.tensor([0, UNLABELLED, 1])
    ce = F.cross_entropy(logits, labels, ignore_index=UNLABELLED)
    by_hand = (F.cross_entropy(logits[[0]], labels[[0]]) + F.cross_entropy(logits[[2]], labels[[2]])) / 2
    assert torch.allclose(ce, by_hand)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    train = write_sentences(root / "train.tsv", 48, seed=1)
    return {
        "root": root,
        "student": save_student(root / "student"),
        "train": train,
        "flipped": relabelled(train, root / "flipped.tsv", flip=True, scramble_first=8),
        "dev": write_sentences(root / "dev.tsv", 16, seed=2),
        "teacher": tiny_teachers["large"],
    }


def transfer_run(workspace: dict[str, Path], train: Path, output_dir: Path) -> dict:
    argv = distill_argv(
        workspace["student"], train, output_dir, {"large": f"local:{workspace['teacher']}"},
        "--hide_train_labels", "--skip_train_samples", "8", "--data_selection", "entropy",
        "--selection_ratio", "0.5", "--validation_file", str(workspace["dev"]), "--eval_strategy", "steps",
        "--eval_steps", "3",
    )  # fmt: skip
    return run_in_process(argv)


def test_only_the_teacher_teaches_on_a_transfer_set(workspace: dict[str, Path], tmp_path: Path) -> None:
    """Flipping every training label and rewriting the skipped rows changes nothing: the student saw
    neither; it learned from the teacher's answers on the selected rows alone."""
    first = transfer_run(workspace, workspace["train"], tmp_path / "a")
    steps = train_log(tmp_path / "a")
    assert [s["ce"] for s in steps] == [0.0, 0.0, 0.0]
    assert all(s["kd"] > 0 and s["loss"] > 0 and s["teacher_rows_large"] == 4 for s in steps)
    second = transfer_run(workspace, workspace["flipped"], tmp_path / "b")
    assert second["eval"] == first["eval"] and second["flops"] == first["flops"]
    assert 0.0 <= first["eval"]["eval_accuracy"] <= 1.0
    first_weights, second_weights = (load_file(tmp_path / run / "model.safetensors") for run in "ab")
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


def test_a_transfer_set_without_a_teacher_is_refused(workspace: dict[str, Path], tmp_path: Path) -> None:
    argv = distill_argv(
        workspace["student"], workspace["train"], tmp_path, {}, "--no_kd", "--hide_train_labels"
    )
    done = run_cli(argv)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("the teacher as the only supervision: it needs KD")
