"""Checkpoints as the ``Trainer`` writes them: `latest`/`auto` pass over incomplete folders, missing or
damaged files are one line naming them, RNG round trips, another model's weights refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertForSequenceClassification

from shared.errors import UserError
from student_trainer.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
)
from student_trainer.train.student import DistillStudent
from student_trainer.train.trainer import PROJECTIONS_FILE, load_student_weights
from tests.tiny_models import tiny_config


def make_student(seed: int, *, projection: bool = True) -> DistillStudent:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_layers=2))
    return DistillStudent(model, {"large": nn.Linear(32, 48)} if projection else {})


def save(output_dir: Path, step: int, student: DistillStudent) -> Path:
    """What a ``DynamicKDTrainer`` checkpoint holds (trainer_state.json written last)."""
    path = output_dir / f"checkpoint-{step}"
    student.model.save_pretrained(path)
    if len(student.projections.state_dict()):
        save_file(
            {k: v.contiguous() for k, v in student.projections.state_dict().items()},
            str(path / PROJECTIONS_FILE),
        )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"python": random.getstate()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_weights_round_trip_and_another_configuration_is_a_clear_error(tmp_path: Path) -> None:
    path = save(tmp_path, 3, make_student(1))
    other = make_student(2)
    load_student_weights(other, path)
    for name, tensor in make_student(1).state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    with pytest.raises(UserError, match="does not fit this student"):
        load_student_weights(make_student(1, projection=False), path)
    wider = DistillStudent(BertForSequenceClassification(tiny_config(num_layers=3)), {})
    with pytest.raises(UserError, match="does not fit this student"):
        load_student_weights(wider, save(tmp_path, 4, make_student(1, projection=False)))


def test_latest_and_auto_pass_over_incomplete_folders(tmp_path: Path) -> None:
    for step in (2, 10, 4):
        save(tmp_path, step, make_student(1, projection=False))
    (tmp_path / "checkpoint-99").mkdir()  # no trainer_state.json: what a kill mid-write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint("auto", tmp_path / "no-run-yet") is None  # a fresh start
    assert resolve_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path) == tmp_path / "checkpoint-4"


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
def test_a_checkpoint_missing_a_file_names_it(tmp_path: Path, missing: str) -> None:
    path = save(tmp_path, 2, make_student(1))
    (path / missing).unlink()
    with pytest.raises(UserError, match=rf"checkpoint-2 has no {missing.split('.')[0]}"):
        resolve_checkpoint("latest", tmp_path)


@pytest.mark.parametrize("damaged", ["scheduler.pt", "model.safetensors"])
def test_a_damaged_checkpoint_file_is_a_user_error(tmp_path: Path, damaged: str) -> None:
    path = save(tmp_path, 2, make_student(1))
    (path / damaged).write_bytes((path / damaged).read_bytes()[:40])  # cut short by a full disk
    with pytest.raises(UserError, match=rf"checkpoint-2/{damaged.replace('.', '[.]')} is damaged"):
        resolve_checkpoint("latest", tmp_path)
