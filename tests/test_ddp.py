"""`torchrun --nproc_per_node 2 student-trainer distill` on CPU (gloo): shards, gradients, summed ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distill_support import (
    checkpoint_tensors,
    distill_argv,
    run_in_process,
    run_torchrun,
    save_student,
    train_log,
    write_sentences,
)

pytestmark = pytest.mark.slow


def test_two_processes_train_like_one_with_the_union_batch(
    tmp_path: Path, tiny_teachers: dict[str, Path]
) -> None:
    """Rank r's batch k is rows 2i+r of the shuffled order, so 2 ranks × 4 rows = 1 process × 8 rows.

    Averaged gradients then give the same training up to float rounding: without the all-reduce
    the weights would drift apart by the learning rate each step. Dropout is off so both runs
    draw nothing random.
    """
    student = save_student(tmp_path / "student", dropout=0.0)
    data = write_sentences(tmp_path / "train.tsv", 40, seed=1)
    method = ["--teacher_selection", "large", "--supervision", "pkd", "--max_steps", "4"]
    method += ["--save_strategy", "steps", "--save_steps", "4"]
    teachers = {"large": f"local:{tiny_teachers['large']}"}

    single = tmp_path / "single"
    run_in_process(distill_argv(student, data, single, teachers, *method))

    ddp = tmp_path / "ddp"
    argv = distill_argv(student, data, ddp, teachers, *method)
    argv[argv.index("--per_device_train_batch_size") + 1] = "4"
    result = run_torchrun(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Distilled a 2-layer student") == 1  # only rank 0 reports

    results = json.loads((ddp / "results.json").read_text())
    assert results["world_size"] == 2
    steps = train_log(ddp)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # one line per step: rank 0 alone writes
    assert all(s["instances"] == 8 and s["teacher_rows_large"] == 8 for s in steps)  # summed over ranks
    assert results["flops"]["instances"] == sum(s["instances"] for s in train_log(single))
    assert len(list((ddp / "checkpoint-4").glob("rng_state_*.pth"))) == 2  # every process's RNG

    expected, got = checkpoint_tensors(single / "checkpoint-4"), checkpoint_tensors(ddp / "checkpoint-4")
    initial = checkpoint_tensors(student)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=2e-5), name
    moved = [n for n in initial if n in expected and not torch.allclose(initial[n], expected[n], atol=1e-4)]
    assert len(moved) > 10  # training did change the weights, so the comparison means something
