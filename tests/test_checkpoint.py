"""Checkpoints: atomic folders, rotation, `latest`, RNG round trips, weights back into the student."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from shared.errors import UserError
from student_trainer.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from student_trainer.train.student import DistillStudent
from tests.tiny_models import save_tiny_tokenizer, tiny_config


def make_student(seed: int, *, projection: bool = True) -> DistillStudent:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_layers=2))
    return DistillStudent(model, {"large": nn.Linear(32, 48)} if projection else {})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def save(output_dir: Path, step: int, student: DistillStudent, tokenizer, **state) -> Path:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(
        output_dir,
        step,
        student=student,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        rank_states=[{"rng": capture_rng_state(), "budget": {"carry": 0.25}}],
        trainer_state={"state": {"global_step": step, **state}, "ledger": {"teacher_flops_small": 10**15}},
        args={"seed": 1},
    )


def test_checkpoint_round_trips_weights_projections_and_state(tmp_path: Path, tokenizer) -> None:
    student = make_student(1)
    path = save(tmp_path, 5, student, tokenizer, epoch=1)
    assert path == tmp_path / "checkpoint-5"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # the folder is also a model directory
    assert BertForSequenceClassification.from_pretrained(path).config.num_hidden_layers == 2

    other = make_student(2)
    saved = load_checkpoint(path, student=other, map_location=torch.device("cpu"))
    for (name, a), (_, b) in zip(student.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert saved["trainer_state"]["state"] == {"global_step": 5, "epoch": 1}
    assert saved["trainer_state"]["ledger"] == {"teacher_flops_small": 10**15}
    assert saved["rank_states"][0]["budget"] == {"carry": 0.25}
    assert "state" in saved["optimizer"] and "base_lrs" in saved["scheduler"]


def test_checkpoint_of_another_configuration_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    path = save(tmp_path, 1, make_student(1), tokenizer)
    with pytest.raises(UserError, match="does not fit this student"):
        load_checkpoint(path, student=make_student(1, projection=False), map_location=torch.device("cpu"))
    wider = DistillStudent(BertForSequenceClassification(tiny_config(num_layers=2, hidden_size=48)), {})
    with pytest.raises(UserError, match="does not fit this student"):
        load_checkpoint(path, student=wider, map_location=torch.device("cpu"))


def test_saving_the_same_step_again_replaces_it(tmp_path: Path, tokenizer) -> None:
    save(tmp_path, 3, make_student(1), tokenizer, epoch=0)
    save(tmp_path, 3, make_student(1), tokenizer, epoch=7)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    assert (
        load_checkpoint(tmp_path / "checkpoint-3", student=make_student(1), map_location=torch.device("cpu"))[
            "trainer_state"
        ]["state"]["epoch"]
        == 7
    )


def test_latest_rotation_and_incomplete_folders(tmp_path: Path, tokenizer) -> None:
    for step in (2, 10, 4):
        save(tmp_path, step, make_student(1, projection=False), tokenizer)
    (tmp_path / "checkpoint-99").mkdir()  # no trainer_state.json: a foreign or broken folder
    (tmp_path / ".tmp-checkpoint-12-abcd").mkdir()  # what a kill mid-write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("auto", tmp_path / "no-run-yet") is None  # a fresh start
    assert resolve_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path) == tmp_path / "checkpoint-4"
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
    assert rotate_checkpoints(tmp_path, keep=None) == []


def test_resolve_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint-<step> folder"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(UserError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path), tmp_path)


def test_rng_state_round_trip_replays_every_generator(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pth")
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))  # no pickled code needed
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"])
def test_a_checkpoint_missing_a_file_names_it(tmp_path: Path, tokenizer, missing: str) -> None:
    path = save(tmp_path, 2, make_student(1), tokenizer)
    (path / missing).unlink()
    with pytest.raises(UserError, match=rf"checkpoint-2 has no {re.escape(missing)}"):
        load_checkpoint(path, student=make_student(1), map_location=torch.device("cpu"))


def test_a_damaged_checkpoint_file_is_a_user_error(tmp_path: Path, tokenizer) -> None:
    path = save(tmp_path, 2, make_student(1), tokenizer)
    (path / "scheduler.pt").write_bytes((path / "scheduler.pt").read_bytes()[:40])  # cut short by a full disk
    with pytest.raises(UserError, match=r"checkpoint-2/scheduler\.pt is damaged"):
        load_checkpoint(path, student=make_student(1), map_location=torch.device("cpu"))
