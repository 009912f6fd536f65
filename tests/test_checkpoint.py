"""Checkpoints as the ``Trainer`` writes them: `latest`/`auto` pass over incomplete folders and fall back
past damaged ones, missing or damaged files are one line naming them, what a killed write left is
removed, RNG round trips, another model's weights refused."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from transformers import BertForSequenceClassification

from shared.errors import UserError
from student_trainer.train.checkpoint import (
    capture_rng_state,
    checkpoint_problem,
    list_checkpoints,
    remove_stale_writes,
    resolve_checkpoint,
    restore_rng_state,
)
from student_trainer.train.checksums import CHECKSUMS, write_checksums
from student_trainer.train.distributed import Processes
from student_trainer.train.guarded import GuardedTrainer, StagedCheckpoint, write_failure
from student_trainer.train.student import DistillStudent
from student_trainer.train.trainer import PROJECTIONS_FILE, load_student_weights
from tests.tiny_models import tiny_config


def make_student(seed: int, *, projection: bool = True) -> DistillStudent:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_layers=2))
    return DistillStudent(model, {"large": nn.Linear(32, 48)} if projection else {})


def save(output_dir: Path, step: int, student: DistillStudent, *, checksums: bool = True) -> Path:
    """What a ``DynamicKDTrainer`` checkpoint holds (checksums.sha256 written last)."""
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
    if checksums:
        write_checksums(path)
    return path


def flip(path: Path, count: int = 64) -> None:
    """Corrupt ``count`` bytes in the middle of a file in place (same size): what a bad disk does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


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
    with pytest.raises(UserError, match=rf"\(newest, checkpoint-2: it has no {missing.split('.')[0]}"):
        resolve_checkpoint("latest", tmp_path)


@pytest.mark.parametrize("damaged", ["scheduler.pt", "model.safetensors"])
def test_a_file_cut_short_is_a_user_error_naming_it(tmp_path: Path, damaged: str) -> None:
    path = save(tmp_path, 2, make_student(1))
    (path / damaged).write_bytes((path / damaged).read_bytes()[:40])
    with pytest.raises(UserError, match=rf"{damaged.replace('.', '[.]')} does not match its checksum"):
        resolve_checkpoint("latest", tmp_path)


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.pt", "kd_state.pt", "trainer_state.json"]
)
def test_a_file_damaged_in_place_is_named_and_auto_falls_back_to_the_checkpoint_before(
    tmp_path: Path, damaged: str
) -> None:
    """64 bytes flipped, same size: a path given is refused naming the file; `auto` and `latest` say
    which checkpoint they skip and why, and resume from the newest one that is whole."""
    for step in (5, 10):
        path = save(tmp_path, step, make_student(1))
        (path / "kd_state.pt").write_bytes(os.urandom(4096))
        write_checksums(path)
    flip(tmp_path / "checkpoint-10" / damaged)
    said: list[str] = []
    for spec in ("auto", "latest"):
        assert resolve_checkpoint(spec, tmp_path, said.append) == tmp_path / "checkpoint-5"
    assert said == [f"skipping {tmp_path / 'checkpoint-10'}: {damaged} does not match its checksum "
                    "(damaged since it was written)"] * 2  # fmt: skip
    with pytest.raises(UserError, match=rf"checkpoint-10: {damaged.replace('.', '[.]')} does not match"):
        resolve_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)
    flip(tmp_path / "checkpoint-5" / damaged)  # no whole checkpoint left: refused, never a fresh start
    with pytest.raises(
        UserError,
        match=r"no checkpoint in .* can be resumed from \(newest, checkpoint-10: .*--overwrite_output_dir",
    ):
        resolve_checkpoint("auto", tmp_path)


def test_a_checkpoint_without_checksums_is_passed_over_until_vouched_for(tmp_path: Path) -> None:
    save(tmp_path, 5, make_student(1))
    unlisted = save(tmp_path, 10, make_student(1), checksums=False)  # a version before checksums
    said: list[str] = []
    assert resolve_checkpoint("auto", tmp_path, said.append) == tmp_path / "checkpoint-5"
    assert f"it has no {CHECKSUMS}" in said[0] and "sha256sum * > checksums.sha256" in said[0]
    with pytest.raises(UserError, match=rf"checkpoint-10: it has no {CHECKSUMS}"):
        resolve_checkpoint(str(unlisted), tmp_path)
    write_checksums(unlisted)  # what `sha256sum * > checksums.sha256` writes
    assert resolve_checkpoint(str(unlisted), tmp_path) == unlisted
    assert checkpoint_problem(unlisted) is None


def test_what_a_killed_write_left_is_removed_and_nothing_else(tmp_path: Path) -> None:
    whole = save(tmp_path, 5, make_student(1))
    staging = tmp_path / ".tmp-checkpoint-10"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint-10").symlink_to(staging.name, target_is_directory=True)
    (tmp_path / ".tmp-notes").mkdir()  # not ours
    assert list_checkpoints(tmp_path) == [whole]  # the link to a folder being written is not a checkpoint
    assert remove_stale_writes(tmp_path) == [".tmp-checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes", "checkpoint-5"]
    assert checkpoint_problem(whole) is None


@pytest.mark.parametrize(
    ("error", "free", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 10**9, "no space left on device"),
        (OSError(errno.EACCES, "Permission denied"), 10**9, "permission denied"),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 0,
         "no space left on device"),  # safetensors
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 4096,
         "no space left on device"),  # torch.save, which drops the errno
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 10**9,
         "a write failed"),
        (RuntimeError("CUDA error: an illegal memory access"), 0, None),  # not the file system's
    ],
)  # fmt: skip
def test_a_write_failure_is_said_in_the_file_systems_words(
    error: Exception, free: int, said: str | None
) -> None:
    assert write_failure(error, free) == said


def write_a_part_on_two_processes(rank: int, folder: str, port: int) -> None:
    """Rank 1's part fails with an error that is not the file system's; each rank notes what it raised."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    trainer = SimpleNamespace(resume_hint="resume", processes=lambda: Processes(rank, 2, torch.device("cpu")))

    def part() -> None:
        if rank == 1:
            raise KeyError("not the file system's")

    try:
        GuardedTrainer._write_part(trainer, StagedCheckpoint(Path(folder), "checkpoint-1"), part)  # type: ignore[arg-type]
    except Exception as err:
        Path(folder, f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


def test_an_error_on_one_process_while_checkpointing_stops_the_others_too(tmp_path: Path) -> None:
    """The failing process raises its own error only after the others heard of it (not left waiting
    in the all-reduce until its timeout)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(write_a_part_on_two_processes, args=(str(tmp_path), port), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == 'KeyError: "not the file system\'s"'
    said = (tmp_path / "rank0.txt").read_text()
    assert said.startswith("CheckpointWriteError: writing checkpoint-1 failed on another process;"), said
