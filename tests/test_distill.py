"""`distill` end to end with the in-process (`local:`) teachers: every method, ledger, budget, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from shared.errors import UserError
from shared.teacher_api import TeacherInfo
from student_trainer.args.distill import parse_distill_args
from student_trainer.cli import main as cli_main
from student_trainer.teachers.client import make_teacher_client
from student_trainer.train import setup as distill_setup
from student_trainer.train.evaluate import majority_baseline
from student_trainer.train.logs import summary_paragraph
from student_trainer.train.setup import make_clients
from student_trainer.train.student import teacher_label_order
from tests.distill_support import (
    METHODS,
    FlakyTeacher,
    checkpoint_tensors,
    distill_argv,
    expected_rows,
    run_in_process,
    save_student,
    train_log,
    write_sentences,
)
from tests.tiny_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    return {
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", 40, seed=1),  # 5 batches of 8
        "dev": write_sentences(root / "dev.tsv", 16, seed=2),
        **{role: path for role, path in tiny_teachers.items()},
    }


def local_teachers(workspace: dict[str, Path], roles=("small", "large")) -> dict[str, str]:
    return {role: f"local:{workspace[role]}" for role in roles}


def argv(workspace, output_dir: Path, *extra: str, roles=("small", "large")) -> list[str]:
    return distill_argv(
        workspace["student"], workspace["train"], output_dir, local_teachers(workspace, roles), *extra
    )


@pytest.mark.parametrize(("teacher", "supervision", "strategy", "kd_loss", "features"), METHODS)
def test_every_method_trains_and_sends_exactly_the_selected_rows(
    workspace, tmp_path: Path, teacher: str, supervision: str, strategy: str, kd_loss: str, features: str
) -> None:
    ratio = 1.0 if strategy == "none" else 0.5
    extra = ["--teacher_selection", teacher, "--supervision", supervision, "--data_selection", strategy]
    extra += ["--selection_ratio", str(ratio), "--kd_loss", kd_loss, "--pt_features", features]
    results = run_in_process(argv(workspace, tmp_path, *extra))

    steps = train_log(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3] and results["global_step"] == 3
    for step in steps:
        assert math.isfinite(step["loss"])
        want = expected_rows(teacher, step["instances"], ratio, strategy)
        assert {r: step[f"teacher_rows_{r}"] for r in ("small", "large")} == want
        assert step["selected_instances"] == (
            want["small"] + want["large"] if teacher == "hard" else max(want.values())
        )
        for role in ("small", "large"):  # a teacher that got rows was paid for them, and only then
            assert (step[f"teacher_flops_{role}"] > 0) == (want[role] > 0)
        if supervision != "kd":
            assert step["pt"] > 0  # the patient loss really ran
    flops = results["flops"]
    assert flops["teacher_flops_spent"] == sum(
        s["teacher_flops_small"] + s["teacher_flops_large"] for s in steps
    )
    assert flops["teacher_flops_vanilla"] == sum(
        s["vanilla_flops_small"] + s["vanilla_flops_large"] for s in steps
    )
    baseline = {teacher} if teacher in ("small", "large") else {"small", "large"}
    assert {r for r in ("small", "large") if flops[f"vanilla_flops_{r}"]} == baseline
    assert flops["teacher_flops_vanilla_unpadded"] < flops["teacher_flops_vanilla"]  # lengths vary
    # every row too (vanilla KD): the in-process engine runs packed, without the padding vanilla counts
    assert flops["teacher_flops_spent"] < flops["teacher_flops_vanilla"]


def test_no_kd_baseline_asks_no_teacher(workspace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = distill_argv(workspace["student"], workspace["train"], tmp_path, {}, "--no_kd")
    results = run_in_process(args)
    assert results["flops"]["teacher_flops_spent"] == results["flops"]["teacher_flops_vanilla"] == 0
    assert results["flops"]["teacher_flops_saved_fraction"] is None
    assert results["flops"]["student_flops"] > 0
    assert "No teacher was queried" in capsys.readouterr().out


def test_a_misspelt_local_teacher_path_is_one_line_and_exit_2(workspace, tmp_path: Path, capsys) -> None:
    argv = distill_argv(workspace["student"], workspace["train"], tmp_path, {"large": "local:./not/there"})
    assert cli_main(["distill", *argv]) == 2
    assert capsys.readouterr().err == (
        "student-trainer distill: error: teacher large (local:./not/there): no such directory: ./not/there\n"
    )


def test_exact_budget_selects_round_n_r_per_epoch(workspace, tmp_path: Path) -> None:
    extra = ["--teacher_selection", "small", "--data_selection", "entropy", "--selection_ratio", "0.3"]
    run_in_process(argv(workspace, tmp_path, *extra, "--exact_budget", "--max_steps", "10", roles=("small",)))
    selected = [s["selected_instances"] for s in train_log(tmp_path)]
    assert sum(selected[:5]) == sum(selected[5:]) == round(40 * 0.3)  # int(8·0.3) per batch would give 10
    assert set(selected) == {2, 3}


def test_evaluation_checkpoints_results_and_summary(workspace, tmp_path: Path, capsys) -> None:
    extra = ["--teacher_selection", "hard", "--data_selection", "lc", "--selection_ratio", "0.5"]
    extra += ["--validation_file", str(workspace["dev"]), "--eval_strategy", "steps", "--eval_steps", "2"]
    extra += ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2", "--max_steps", "5"]
    results = run_in_process(argv(workspace, tmp_path, *extra))

    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["event"] == "eval"] == [2, 4, 5]
    assert 0.0 <= results["eval"]["eval_accuracy"] <= 1.0 and results["eval"]["eval_loss"] > 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["flops"] == results["flops"] and saved["global_step"] == 5
    assert 0 < saved["flops"]["teacher_flops_saved_fraction"] < 1
    out = capsys.readouterr().out
    assert "Distilled a 2-layer student" in out and "Dynamic KD's choices saved" in out and "accuracy" in out
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.strip() in out and "Majority-class baseline of the evaluation set (always" in summary
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(
        tmp_path
    )  # the student, without projections
    assert exported.config.num_hidden_layers == 2 and exported.config.id2label == {0: "0", 1: "1"}


def test_a_student_not_above_the_majority_baseline_is_flagged(workspace, tmp_path: Path, capsys) -> None:
    """An evaluation set of one label: always predicting it scores 1.0, which no student can beat."""
    lines = (workspace["dev"]).read_text().splitlines()
    dev = tmp_path / "dev_one_label.tsv"
    majority = max(
        "01",
        key=lambda y: sum(line.endswith(f"\t{y}") for line in workspace["train"].read_text().splitlines()),
    )
    dev.write_text(
        "\n".join([lines[0], *(line.rsplit("\t", 1)[0] + f"\t{majority}" for line in lines[1:])]) + "\n"
    )
    extra = ["--validation_file", str(dev), "--no_kd", "--metric", "mcc"]
    results = run_in_process(argv(workspace, tmp_path / "run", *extra))
    assert results["majority_baseline"] == {
        "label": majority,
        "metric": "mcc",
        "eval_accuracy": 1.0,
        "eval_mcc": 0.0,  # a constant prediction has no correlation (MCC undefined -> 0)
    }
    # one true label: the student's MCC is 0 too (undefined), so it is not above the baseline
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["eval"]["eval_mcc"] == 0.0 and saved["above_majority_baseline"] is False
    assert saved["majority_baseline"] == results["majority_baseline"]
    err = capsys.readouterr().err
    assert "WARNING: the student's mcc 0.0000 is not above the majority-class baseline 0.0000" in err
    no_eval = run_in_process(argv(workspace, tmp_path / "no_eval", "--no_kd"))
    assert no_eval["majority_baseline"] is None and no_eval["above_majority_baseline"] is None
    assert "WARNING" not in capsys.readouterr().err


def summary_of(score: float, baseline: dict | None, accuracy: float | None = None) -> str:
    """The summary paragraph of an 82 %-saving run whose student scored ``score`` in accuracy and F1
    (``accuracy``, when given, apart)."""
    ledger = {
        "teacher_flops_spent": 18e9,
        "teacher_flops_vanilla": 100e9,
        "teacher_flops_vanilla_unpadded": 60e9,
    }
    ledger |= {"teacher_flops_saved_fraction": 0.82, "teacher_flops_saved_by_method": 0.5}
    ledger |= {"teacher_flops_saved_by_service": 0.4}
    ledger |= {"teacher_flops_requested": 30e9, "teacher_cache_hits": 0, "student_flops": 50e9}
    results = {"flops": ledger, "student_layers": 2, "task": "sst2", "global_step": 10, "epoch": 1.0}
    results |= {"world_size": 1, "train_runtime_s": 3.0, "majority_baseline": baseline}
    results["eval"] = {"eval_loss": 0.7, "eval_accuracy": score if accuracy is None else accuracy}
    results["eval"] |= {"eval_f1": score, "eval_mcc": score}
    args = parse_distill_args(["--model_name_or_path", "m", "--output_dir", "o", "--task", "sst2"]
                              + ["--data_dir", "d", "--teacher", "large=http://h:1"])  # fmt: skip
    return summary_paragraph(args, results)


def test_a_saving_never_stands_alone_beside_a_student_at_the_majority_baseline() -> None:
    baseline = {"label": "positive", "metric": "f1", "eval_accuracy": 0.509, "eval_f1": 0.675}
    at_baseline = summary_of(0.68, baseline)
    assert (
        "Majority-class baseline of the evaluation set (always 'positive'): accuracy 0.5090, f1 0.6750."
        in (at_baseline)
    )
    assert "f1 0.6800 is within 0.01 of that baseline: it has not learned the task" in at_baseline
    assert (
        "choices saved 50.0% of the teacher FLOPs, for a student that learned nothing usable:" in at_baseline
    )
    assert "f1 0.3000 is below that baseline: it has not learned" in summary_of(0.3, baseline)
    learned = summary_of(0.85, baseline)
    assert "accuracy 0.5090" in learned and "within" not in learned
    assert "Dynamic KD's choices saved 50.0% of the teacher FLOPs: the rows sent cost 30.00 GFLOPs" in learned
    assert "The service then computed 18.00 GFLOPs for them (40.0% less;" in learned
    assert "(100.00 GFLOPs), the teachers' bill is 82.0% lower." in learned
    assert learned.index("choices saved") < learned.index("service then") < learned.index("bill is")
    assert "Majority-class" not in summary_of(0.85, None) and "82.0% lower." in summary_of(0.85, None)


def test_results_and_summary_judge_the_majority_baseline_on_the_tasks_metric_alike() -> None:
    """CoLA: a student at MCC 0.004 (the majority's is 0) whose accuracy is below the majority's has
    learned nothing, in ``results.json``, the summary and the experiment report alike."""
    from student_trainer.experiments.report import below_majority
    from student_trainer.train.metrics import above_majority_baseline

    baseline = {"label": "1", "metric": "mcc", "eval_accuracy": 0.691, "eval_mcc": 0.0}
    for mcc, accuracy, learned in [(0.004, 0.683, False), (0.0, 0.70, False), (0.25, 0.72, True)]:
        evaluation = {"eval_accuracy": accuracy, "eval_mcc": mcc}
        assert above_majority_baseline(evaluation, baseline) is learned
        summary = summary_of(mcc, {**baseline, "metric": "mcc"}, accuracy=accuracy)
        assert ("learned nothing usable" in summary) is not learned, summary
        rows = [{"method": "kd", "tasks": {"cola": {"mean": mcc}}}]
        task = {"metric": "mcc", "majority_baseline": baseline}
        assert bool(below_majority(rows, {"cola": task})) is not learned


@pytest.mark.parametrize(
    ("metric", "train", "evaluation", "expected"),
    [
        ("accuracy", [1, 1, 0], [1, 0, 0, 0], {"label": "b", "eval_accuracy": 0.25}),
        ("f1", [1, 1, 0], [1, 0, 0, 0], {"label": "b", "eval_accuracy": 0.25, "eval_f1": 0.4}),
        ("f1", [0, 0, 1], [1, 1, 0], {"label": "a", "eval_accuracy": 1 / 3, "eval_f1": 0.0}),
        ("mcc", [0, 1], [1, 0, 1], {"label": "a", "eval_accuracy": 1 / 3, "eval_mcc": 0.0}),  # tie: lower
    ],
)
def test_majority_baseline_scores_the_constant_predictor(metric, train, evaluation, expected) -> None:
    assert majority_baseline(train, evaluation, metric, ["a", "b"]) == {**expected, "metric": metric}


RESUMABLE = ["--teacher_selection", "hard", "--supervision", "uncertainty", "--data_selection", "random"]
RESUMABLE += ["--selection_ratio", "0.5", "--exact_budget", "--max_steps", "12", "--save_strategy", "steps"]
RESUMABLE += ["--save_steps", "100", "--warmup_ratio", "0.2"]


def test_teacher_down_leaves_a_checkpoint_and_resuming_is_bit_identical(
    workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout, random selection, the budget carry, projections, epochs: all must replay exactly.

    ``auto`` (what a restarted compose job passes) starts the reference afresh and resumes the other."""
    reference = tmp_path / "reference"
    run_in_process(argv(workspace, reference, *RESUMABLE, "--resume_from_checkpoint", "auto"))

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(
        distill_setup,
        "make_teacher_client",
        lambda spec, name, **options: FlakyTeacher(
            make_teacher_client(spec, name=name, **options), answers=7 if name == "large" else 100
        ),
    )
    with pytest.raises(UserError, match=r"teacher 'large' failed.*stopped at step 7.*resumable checkpoint"):
        run_in_process(argv(workspace, interrupted, *RESUMABLE))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-7"]
    monkeypatch.undo()
    with (interrupted / "metrics.jsonl").open("a") as log:
        log.write('{"event": "train", "step": 8, "epo')  # what a kill in the middle of a write leaves

    resumed = run_in_process(argv(workspace, interrupted, *RESUMABLE, "--resume_from_checkpoint", "auto"))
    assert resumed["global_step"] == 12
    assert [s["step"] for s in train_log(interrupted)] == list(range(1, 13))  # every step once
    final, expected = (
        checkpoint_tensors(interrupted / "checkpoint-12"),
        checkpoint_tensors(reference / "checkpoint-12"),
    )
    assert final.keys() == expected.keys() and any(k.startswith("projections.") for k in final)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    reference_results = json.loads((reference / "results.json").read_text())
    assert resumed["flops"] == reference_results["flops"]  # the ledger carried over exactly


def test_by_default_two_checkpoints_are_kept_each_resumable(workspace, tmp_path: Path) -> None:
    """A checkpoint is ~200 MB at BERT-base size: a run rotates to 2 unless told otherwise, and
    every checkpoint kept still holds the optimizer state that resuming needs."""
    saving = ["--teacher_selection", "small", "--save_strategy", "steps", "--save_steps", "1"]
    run_in_process(argv(workspace, tmp_path, *saving, "--max_steps", "4", roles=("small",)))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert all((tmp_path / f"checkpoint-{step}" / "optimizer.pt").is_file() for step in (3, 4))
    resumed = run_in_process(
        argv(
            workspace,
            tmp_path,
            *saving,
            "--max_steps",
            "6",
            "--resume_from_checkpoint",
            "latest",
            roles=("small",),
        )
    )
    assert resumed["global_step"] == 6 and [s["step"] for s in train_log(tmp_path)] == list(range(1, 7))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    keep_all = tmp_path / "keep_all"
    run_in_process(
        argv(workspace, keep_all, *saving, "--max_steps", "3", "--save_total_limit", "0", roles=("small",))
    )
    assert len(list(keep_all.glob("checkpoint-*"))) == 3


def test_a_new_run_does_not_mix_with_an_old_runs_checkpoints(workspace, tmp_path: Path) -> None:
    checkpointing = ["--save_strategy", "steps", "--save_steps", "3", "--no_kd"]
    run_in_process(distill_argv(workspace["student"], workspace["train"], tmp_path, {}, *checkpointing))
    again = distill_argv(
        workspace["student"], workspace["train"], tmp_path, {}, *checkpointing, "--max_steps", "2"
    )
    with pytest.raises(UserError, match="already holds checkpoint-3.*--overwrite_output_dir"):
        run_in_process(again)
    run_in_process(again + ["--overwrite_output_dir"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


def test_the_api_key_comes_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t.tsv"]
    argv += [
        "--teacher",
        "large=http://127.0.0.1:9",
        "--api_key_env",
        "KD_TEST_KEY",
        "--teacher_timeout",
        "7",
    ]
    args = parse_distill_args(argv)
    monkeypatch.setenv("KD_TEST_KEY", "s3cret")
    client = make_clients(args, torch.device("cpu"))["large"]
    assert (client.api_key, client.timeout_s, client.model) == ("s3cret", 7.0, "large")
    monkeypatch.setenv("KD_TEST_KEY", "\n")  # whitespace only: no key, not an empty Authorization header
    with pytest.raises(UserError, match="--api_key_env KD_TEST_KEY: the API key is empty or unset"):
        make_clients(args, torch.device("cpu"))
    monkeypatch.delenv("KD_TEST_KEY")
    with pytest.raises(UserError, match="--api_key_env KD_TEST_KEY: the API key is empty or unset"):
        make_clients(args, torch.device("cpu"))


def test_report_to_tensorboard_gets_the_loss_and_kd_metrics_of_metrics_jsonl(
    workspace, tmp_path: Path
) -> None:
    """Any ``TrainingArguments`` flag works on the command line: ``--report_to tensorboard`` writes
    the same per-step values that ``metrics.jsonl`` holds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = [
        "--teacher_selection",
        "small",
        "--report_to",
        "tensorboard",
        "--gradient_accumulation_steps",
        "2",
    ]
    run_in_process(argv(workspace, tmp_path, *extra, roles=("small",)))
    (run,) = {event.parent for event in tmp_path.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    steps = train_log(tmp_path)
    assert [s["instances"] for s in steps] == [16, 16, 8]  # two batches a step; the epoch's 5th alone
    for tag in ("loss", "kd", "teacher_flops_spent"):
        scalars = events.Scalars(f"train/{tag}")
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([s[tag] for s in steps], rel=1e-6)


@pytest.mark.parametrize(
    ("teacher", "data", "order"),
    [
        (("negative", "positive"), ["negative", "positive"], None),
        (("POSITIVE", "Negative"), ["negative", "positive"], [1, 0]),
        (("contradiction", "entailment", "neutral"), ["entailment", "neutral", "contradiction"], [1, 2, 0]),
        (("LABEL_0", "LABEL_1"), ["positive", "negative"], None),  # index names: the index is the contract
        (("negative", "positive"), ["1", "0"], None),
    ],
)
def test_teacher_label_order_matches_names(teacher, data, order) -> None:
    info = TeacherInfo("t", 2, 32, len(teacher), teacher, 100, 64)
    assert teacher_label_order("large", info, data) == order


def test_teacher_with_other_label_names_is_refused_in_one_line() -> None:
    info = TeacherInfo("t", 2, 32, 2, ("neg", "pos"), 100, 64)
    with pytest.raises(UserError, match=r"teacher large labels \['neg', 'pos'\] are not the data's labels"):
        teacher_label_order("large", info, ["negative", "positive"])


def test_a_teacher_listing_the_labels_in_another_order_teaches_the_same(workspace, tmp_path: Path) -> None:
    """The same teacher with its classes (head rows and names) swapped must give the same run."""
    model = BertForSequenceClassification.from_pretrained(workspace["large"])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label, model.config.label2id = (
        {0: "positive", 1: "negative"},
        {"positive": 0, "negative": 1},
    )
    model.save_pretrained(tmp_path / "swapped")
    save_tiny_tokenizer(tmp_path / "swapped")
    named = tmp_path / "named.tsv"
    lines = workspace["train"].read_text().splitlines()
    named.write_text(
        "\n".join(
            [
                lines[0],
                *(
                    f"{t}\t{'negative positive'.split()[int(y)]}"
                    for t, y in (line.split("\t") for line in lines[1:])
                ),
            ]
        )
        + "\n"
    )

    def losses(teacher: Path, out: str) -> list[float]:
        extra = ["--data_selection", "entropy", "--selection_ratio", "0.5", "--max_steps", "4"]
        run_in_process(
            distill_argv(workspace["student"], named, tmp_path / out, {"large": f"local:{teacher}"}, *extra)
        )
        return [step["kd"] for step in train_log(tmp_path / out)]

    assert losses(tmp_path / "swapped", "swapped-run") == losses(workspace["large"], "plain-run")
