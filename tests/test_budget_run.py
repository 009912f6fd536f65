"""A teacher budget in whole runs: a real service with a ladder of three teachers agrees with the
ledger and the budget holds; a killed run resumes with its budget state bit for bit."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from teacher_server.launch import serve_in_subprocess
from tests.distill_support import (
    checkpoint_tensors,
    distill_argv,
    kill_after_checkpoint,
    run_cli,
    run_in_process,
    run_torchrun,
    save_student,
    service_metrics,
    train_log,
    write_sentences,
)
from tests.tiny_models import save_tiny_bert

pytestmark = pytest.mark.slow

DEPTHS = {"deep": 4, "shallow": 1, "mid": 2}  # named out of order: the ladder orders them by FLOPs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("budget")
    ladder = {
        name: save_tiny_bert(root / name, num_layers=n, hidden_size=32, seed=n) for name, n in DEPTHS.items()
    }
    return {
        "root": root,
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", 48, seed=4, min_words=1, max_words=14),
        **tiny_teachers,
        **ladder,
    }


@pytest.mark.parametrize(
    ("selection", "strategy", "budget"), [("hard", "entropy", "25%"), ("soft", "margin", "40%")]
)
def test_a_ladder_of_three_against_the_service_spends_within_the_budget(
    workspace, tmp_path, capsys, selection, strategy, budget
) -> None:
    config = tmp_path / "teachers.yaml"
    entries = [
        {"name": name, "path": str(workspace[name]), "max_queue_delay_ms": 1, "batch_invariant": True}
        for name in DEPTHS
    ]  # batch-invariant: one row per pass at its own length, so the service's FLOPs are exact
    config.write_text(yaml.safe_dump({"cache_max_bytes": 0, "teachers": entries}))
    with serve_in_subprocess(config, log_path=tmp_path / "server.log") as url:
        before = service_metrics(url)
        argv = distill_argv(
            workspace["student"], workspace["train"], tmp_path / "out", dict.fromkeys(DEPTHS, url)
        )
        argv += ["--teacher_selection", selection, "--data_selection", strategy, "--teacher_budget", budget]
        results = run_in_process(argv + ["--max_steps", "6"])
        after = service_metrics(url)

    flops = results["flops"]
    assert results["teacher_ladder"] == ["shallow", "mid", "deep"]
    for name in DEPTHS:  # what the service ran, from its own metrics, is what the ledger says
        rows = after[("teacher_batch_size_sum", name)] - before[("teacher_batch_size_sum", name)]
        computed = after[("teacher_flops_total", name)] - before[("teacher_flops_total", name)]
        assert rows == flops[f"teacher_rows_{name}"] > 0
        # requested: the whole teacher; the service runs only [CLS] through the last layer
        assert computed == flops[f"teacher_flops_{name}"] < flops[f"requested_flops_{name}"]
    whole = math.floor(Fraction(budget.rstrip("%")) / 100 * flops["teacher_flops_vanilla_unpadded"])
    assert flops["teacher_budget_flops"] == whole
    assert flops["teacher_flops_requested"] == flops["teacher_budget_spent_flops"] <= whole
    assert flops["teacher_flops_requested"] > whole / 2  # the budget was spent, not hoarded
    summary = capsys.readouterr().out
    assert f"'{selection}' over shallow < mid < deep" in summary and f"Teacher budget {budget}:" in summary
    for step in train_log(tmp_path / "out"):  # spend vs the paced bound, every step
        assert step["teacher_budget_spent_flops"] <= step["teacher_budget_flops"]


def budget_argv(workspace, output_dir: Path, method: list[str]) -> list[str]:
    teachers = {role: f"local:{workspace[role]}" for role in ("small", "large")}
    argv = distill_argv(workspace["student"], workspace["train"], output_dir, teachers, *method)
    return argv + ["--max_steps", "24", "--save_strategy", "steps", "--save_steps", "4"]


def rank_budget_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "kd_state.pt", weights_only=True)["selector"]["teacher_budget"]


@pytest.mark.parametrize(
    "method",
    [
        ["--teacher_selection", "hard", "--data_selection", "entropy", "--teacher_budget", "30%"],
        ["--teacher_selection", "soft", "--data_selection", "random", "--teacher_budget", "20MF"],
    ],
    ids=["hard-entropy-fraction", "soft-random-absolute"],
)
def test_a_killed_budgeted_run_resumes_bit_exactly(workspace, tmp_path: Path, method: list[str]) -> None:
    reference = run_cli(budget_argv(workspace, tmp_path / "reference", method))
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    kill_after_checkpoint(budget_argv(workspace, killed, method), killed, 8)
    assert not (killed / "results.json").exists()
    resumed = run_cli(budget_argv(workspace, killed, method) + ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr

    keys = ("teacher_rows_small", "teacher_rows_large", "requested_flops_small", "requested_flops_large")
    keys += ("teacher_budget_spent_flops", "teacher_budget_flops", "loss")
    expected, got = train_log(tmp_path / "reference"), train_log(killed)
    assert [[s[k] for k in keys] for s in got] == [[s[k] for k in keys] for s in expected]  # same rows, spend
    assert sum(s["selected_instances"] for s in expected) > 0
    assert rank_budget_state(killed / "checkpoint-24") == rank_budget_state(
        tmp_path / "reference" / "checkpoint-24"
    )
    final, wanted = (
        checkpoint_tensors(killed / "checkpoint-24"),
        checkpoint_tensors(tmp_path / "reference" / "checkpoint-24"),
    )
    assert final.keys() == wanted.keys()
    for name, tensor in wanted.items():
        assert torch.equal(final[name], tensor), name  # same weights, bit for bit
    spent = json.loads((killed / "results.json").read_text())["flops"]["teacher_budget_spent_flops"]
    assert spent == rank_budget_state(killed / "checkpoint-24")["spent"]


def test_two_processes_each_pace_their_share_and_keep_the_whole_budget(workspace, tmp_path: Path) -> None:
    """Under torchrun every rank buys rows from its own batches against its own share of the budget;
    the ledger (every teacher of the ladder, summed over ranks) holds the ranks' spend together."""
    output = tmp_path / "ddp"
    teachers = {name: f"local:{workspace[name]}" for name in DEPTHS}
    argv = distill_argv(workspace["student"], workspace["train"], output, teachers)
    argv += ["--teacher_selection", "hard", "--data_selection", "entropy", "--teacher_budget", "30%"]
    argv += ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4"]
    argv[argv.index("--per_device_train_batch_size") + 1] = "4"
    result = run_torchrun(argv)
    assert result.returncode == 0, result.stderr[-3000:]

    flops = json.loads((output / "results.json").read_text())["flops"]
    ranks = [
        torch.load(output / "checkpoint-4" / f"kd_state_{rank}.pt", weights_only=True)["selector"]
        for rank in (0, 1)
    ]
    assert len(ranks) == 2
    assert flops["teacher_flops_requested"] == sum(rank["teacher_budget"]["spent"] for rank in ranks) > 0
    assert flops["teacher_flops_vanilla_unpadded"] == sum(rank["teacher_budget"]["vanilla"] for rank in ranks)
    assert flops["teacher_budget_spent_flops"] <= flops["teacher_budget_flops"]
    assert sum(flops[f"teacher_rows_{name}"] for name in DEPTHS) == flops["selected_instances"]
