"""Processes killed mid-run resume to bit-identical weights; bad set-ups fail in one line."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from student_trainer.cli import main
from tests.distill_support import (
    REPO,
    checkpoint_tensors,
    distill_argv,
    kill_after_checkpoint,
    run_cli,
    save_student,
    train_log,
    write_sentences,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    return {
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", 40, seed=1),
        **tiny_teachers,
    }


def resumable_argv(workspace, output_dir: Path) -> list[str]:
    teachers = {role: f"local:{workspace[role]}" for role in ("small", "large")}
    return distill_argv(
        workspace["student"],
        workspace["train"],
        output_dir,
        teachers,
        *["--teacher_selection", "soft", "--supervision", "pkd", "--data_selection", "random"],
        *["--selection_ratio", "0.5", "--exact_budget", "--max_steps", "30", "--save_strategy", "steps"],
        *["--save_steps", "5", "--warmup_ratio", "0.1"],
    )


def test_killed_run_resumes_to_bit_identical_weights(workspace, tmp_path: Path) -> None:
    reference = run_cli(resumable_argv(workspace, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    killed_dir = tmp_path / "killed"
    kill_after_checkpoint(resumable_argv(workspace, killed_dir), killed_dir, 5)
    assert not (killed_dir / "checkpoint-30").exists() and not (killed_dir / "results.json").exists()

    resumed = run_cli(resumable_argv(workspace, killed_dir) + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    final = checkpoint_tensors(killed_dir / "checkpoint-30")
    expected = checkpoint_tensors(tmp_path / "reference" / "checkpoint-30")
    assert final.keys() == expected.keys()
    resumed_from = resumed.stderr.split("Resuming from", 1)[1].split("\n", 1)[0]
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), f"{name} differs after resuming from{resumed_from}"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_checkpoints_its_last_step_exits_130_and_resumes(workspace, tmp_path, stop) -> None:
    output = tmp_path / "run"
    teachers = {"large": f"local:{workspace['large']}"}
    argv = distill_argv(workspace["student"], workspace["train"], output, teachers, "--max_steps", "200")
    process = subprocess.Popen(
        [sys.executable, "-m", "student_trainer.cli", "distill", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (output / "metrics.jsonl").exists() or not train_log(output):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.05)
    process.send_signal(stop)
    assert process.wait(60) == 130  # not a usage error (2), not killed by the signal
    last = process.stderr.read().strip().splitlines()[-1]
    step = max(record["step"] for record in train_log(output))
    assert step < 200 and (output / f"checkpoint-{step}").is_dir()  # --save_strategy no: the signal's
    assert last == (
        f"student-trainer distill: interrupted at step {step}, after a checkpoint in {output} "
        "(continue with --resume_from_checkpoint latest)"
    )
    resumed = run_cli([*argv[:-2], "--max_steps", str(step + 2), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in train_log(output)][-2:] == [step + 1, step + 2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """The real entry point (``student-trainer distill``) in this process: exit code, stderr lines."""
    code = main(["distill", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        (
            "local:/no/such/teacher",
            "teacher small (local:/no/such/teacher): no such directory: /no/such/teacher",
        ),
        (f"http://127.0.0.1:{free_port()}", "is not ready after 1 s"),
    ],
)
def test_a_teacher_that_is_not_there_is_one_line_and_exit_2(
    workspace, tmp_path, capsys, teacher, message
) -> None:
    argv = distill_argv(workspace["student"], workspace["train"], tmp_path, {"small": teacher})
    code, lines = run_main(argv + ["--teacher_ready_timeout", "1"], capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("student-trainer distill: error:") and message in lines[0]


def test_bad_data_file_is_one_line(workspace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine movie\t1\nno label here\n")
    code, lines = run_main(distill_argv(workspace["student"], bad, tmp_path / "out", {}, "--no_kd"), capsys)
    assert code == 2
    assert len(lines) == 1 and "bad.tsv, line 3" in lines[0]


def test_a_non_finite_loss_is_one_line_and_exit_4(workspace, tmp_path, capsys) -> None:
    argv = distill_argv(
        workspace["student"], workspace["train"], tmp_path, {"large": f"local:{workspace['large']}"}
    )
    code, lines = run_main([*argv, "--learning_rate", "1e12"], capsys)  # the weights blow up at once
    assert code == 4
    assert lines[-1].startswith(
        "student-trainer distill: error: the training loss is nan at step 2: stopped "
    )
    assert not list(tmp_path.glob("*checkpoint-*"))


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_exit_5(
    workspace, tmp_path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = torch.save

    def fills_the_disk(obj, file, *args, **kwargs):
        if str(file).endswith("checkpoint-4/scheduler.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    argv = distill_argv(
        workspace["student"], workspace["train"], tmp_path, {"large": f"local:{workspace['large']}"}
    )
    code, lines = run_main(
        [*argv, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4"], capsys
    )
    assert code == 5
    assert lines[-1].startswith(
        "student-trainer distill: error: no space left on device while writing checkpoint-4: [Errno 28] "
    )  # the files being written name the link to .tmp-checkpoint-4/
    assert lines[-1].endswith(
        f"; checkpoint-4 was removed, {tmp_path / 'checkpoint-2'} is the last good checkpoint "
        "(continue with --resume_from_checkpoint latest)"
    )
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-2"]
