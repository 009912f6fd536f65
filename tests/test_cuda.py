"""The CUDA paths, where a GPU is (skipped elsewhere; CI has none): every family's engine (encoders
and decoder classifiers) answers on the GPU what it answers on the CPU, in fp32, fp16 and bf16; the
service serves a GPU teacher; a distill run on the GPU is killed mid-run and resumes to the same
weights; its checkpoint loads on a machine without a GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.teacher_api import TeacherQuery
from student_trainer.train.checkpoint import list_checkpoints
from teacher_engine.engine import TeacherEngine
from teacher_server.launch import serve_in_subprocess
from tests.distill_support import (
    REPO,
    checkpoint_tensors,
    distill_argv,
    run_cli,
    save_student,
    write_sentences,
)
from tests.tiny_families import ALL_CASES, save_tiny_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad , i hate it", "fun !"]


@pytest.mark.parametrize("case", sorted(ALL_CASES))
@pytest.mark.parametrize(("dtype", "atol"), [("fp32", 1e-4), ("fp16", 0.02), ("bf16", 0.1)])
def test_every_family_answers_on_the_gpu_what_it_answers_on_the_cpu(tmp_path, case, dtype, atol):
    path = save_tiny_family(case, tmp_path / case)
    cpu = TeacherEngine.load(case, path)
    gpu = TeacherEngine.load(case, path, device="cuda", dtype=dtype)
    ids, mask, types = cpu.tokenize(TEXTS)
    every = tuple(range(cpu.info.num_layers + 1))
    query = TeacherQuery(ids, mask, types, want_logits=True, cls_layers=every, token_layers=(1,))
    expected, answer = cpu.run(query), gpu.run(query)
    assert answer.logits.device.type == "cpu" and answer.logits.dtype == torch.float32
    torch.testing.assert_close(answer.logits, expected.logits, atol=atol, rtol=0)
    torch.testing.assert_close(answer.hidden_cls, expected.hidden_cls, atol=atol * 10, rtol=0)
    torch.testing.assert_close(answer.hidden_states, expected.hidden_states, atol=atol * 10, rtol=0)
    assert answer.teacher_flops == expected.teacher_flops


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    return {
        "student": save_student(root / "student"),
        "teacher": save_student(root / "teacher", num_layers=3, seed=11),
        "train": write_sentences(root / "train.tsv", 40, seed=1),
        "root": root,
    }


def test_a_gpu_teacher_served_over_rest_trains_a_gpu_student(workspace, tmp_path):
    config = tmp_path / "teachers.yaml"
    config.write_text(f"teachers:\n  - {{name: large, path: {workspace['teacher']}, device: cuda}}\n")
    with serve_in_subprocess(config, log_path=tmp_path / "server.log") as url:
        argv = distill_argv(
            workspace["student"], workspace["train"], tmp_path / "out", {"large": f"{url}#large"},
            *["--teacher_selection", "large", "--data_selection", "entropy", "--selection_ratio", "0.5"],
            *["--use_cpu", "false"],  # CUDA: the Trainer's default where there is one
        )  # fmt: skip
        done = run_cli(argv)
    assert done.returncode == 0, done.stderr
    assert '"use_cpu": false' in (tmp_path / "out" / "results.json").read_text()


def resumable_argv(workspace, output_dir: Path) -> list[str]:
    return distill_argv(
        workspace["student"], workspace["train"], output_dir, {"large": f"local:{workspace['teacher']}"},
        *["--teacher_selection", "large", "--supervision", "pkd", "--data_selection", "entropy"],
        *["--selection_ratio", "0.5", "--max_steps", "30", "--save_strategy", "steps", "--save_steps", "5"],
        *["--use_cpu", "false"],
    )  # fmt: skip


def test_a_gpu_run_killed_mid_run_resumes_to_the_same_weights(workspace, tmp_path):
    reference = run_cli(resumable_argv(workspace, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "student_trainer.cli", "distill", *resumable_argv(workspace, killed)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while killed / "checkpoint-5" not in list_checkpoints(killed):  # whole: renamed from .tmp-checkpoint-5
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_cli(resumable_argv(workspace, killed) + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    final = checkpoint_tensors(killed / "checkpoint-30")
    expected = checkpoint_tensors(tmp_path / "reference" / "checkpoint-30")
    for name, tensor in expected.items():  # CUDA kernels may differ in the last bits between runs
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0, msg=name)
    # a checkpoint made on the GPU resumes on a machine without one (its CUDA RNG state is skipped)
    argv = resumable_argv(workspace, tmp_path / "on-cpu")
    resume = ["--resume_from_checkpoint", str(killed / "checkpoint-25")]
    on_cpu = run_cli([*argv[:-2], "--use_cpu", *resume])
    assert on_cpu.returncode == 0, on_cpu.stderr
    assert (tmp_path / "on-cpu" / "checkpoint-30").exists()
