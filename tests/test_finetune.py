"""`student-trainer finetune` on a tiny random BERT: a teacher the service serves, that learned something."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from shared.errors import UserError
from shared.teacher_api import TeacherQuery
from student_trainer.args.distill import parse_distill_args
from student_trainer.args.finetune import FinetuneArguments
from student_trainer.cli import build_parser
from student_trainer.data.readers import load_task
from student_trainer.data.synthetic import write_synthetic_task
from student_trainer.train.checkpoint import list_checkpoints
from student_trainer.train.distill import distill as train_student
from student_trainer.train.finetune import finetune
from teacher_engine.engine import TeacherEngine
from teacher_server.launch import serve_in_subprocess
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_task(tmp_path_factory.mktemp("synthetic"), num_train=128, num_dev=64, seed=0)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("base") / "bert", num_layers=4, hidden_size=32, seed=0)


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["finetune", *argv])


def test_finetuned_teacher_loads_in_the_service_and_beats_chance(
    synthetic_dir: Path, base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "teacher"
    args = parse(
        ["--model_name_or_path", str(base_model), "--num_layers", "2", "--task", "synthetic"]
        + ["--data_dir", str(synthetic_dir), "--output_dir", str(out), "--learning_rate", "5e-3"]
        + ["--num_train_epochs", "15", "--per_device_train_batch_size", "16", "--max_seq_length", "64"]
        + ["--warmup_ratio", "0.1", "--logging_steps", "50", "--seed", "0", "--disable_tqdm"]
    )
    assert args.func(args) == 0
    assert "saved the fine-tuned teacher" in capsys.readouterr().out

    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 64 and 0.0 <= results["eval_accuracy"] <= 1.0
    assert results["global_step"] == 15 * 8  # 128 / 16 = 8 steps per epoch

    engine = TeacherEngine.load("small", out)  # exactly what teacher-server does at start-up
    assert engine.info.label_names == ("negative", "positive")
    assert engine.info.num_layers == 2

    train = load_task("synthetic", synthetic_dir)
    input_ids, attention_mask, token_type_ids = engine.tokenize([e.text_a for e in train.examples])
    answer = engine.run(TeacherQuery(input_ids, attention_mask, token_type_ids))
    labels = torch.tensor([e.label for e in train.examples])
    accuracy = (answer.logits.argmax(dim=-1) == labels).float().mean().item()
    assert accuracy > 0.7, accuracy  # chance is ~0.5 (balanced labels)

    # ... and the real service (a separate process) serves it unchanged: same answers over REST,
    # then a student distils from it remotely.
    config = tmp_path / "teachers.yaml"
    config.write_text(f"teachers:\n  - name: small\n    path: {out}\n    max_batch_size: 128\n")
    with serve_in_subprocess(config, log_path=tmp_path / "server.log") as url:
        texts = [e.text_a for e in train.examples]
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        reply = httpx.post(f"{url}/v2/models/small/infer", json=body, timeout=60).json()
        served = torch.tensor(reply["outputs"][0]["data"]).view(len(texts), 2)
        assert torch.allclose(served, answer.logits, atol=1e-5)
        student_out = tmp_path / "student"
        results = train_student(
            parse_distill_args(
                ["--model_name_or_path", str(out), "--student_num_layers", "1", "--task", "synthetic"]
                + ["--data_dir", str(synthetic_dir), "--output_dir", str(student_out), "--max_steps", "3"]
                + ["--teacher", f"small={url}", "--per_device_train_batch_size", "16", "--use_cpu"]
                + ["--save_strategy", "no", "--disable_tqdm"]
            )
        )
    assert results["global_step"] == 3 and results["flops"]["teacher_flops_vanilla"] > 0
    training = {"global_step", "epoch", "train_loss", "train_runtime_s", "train_samples_per_second"}
    finetuned = json.loads((out / "eval_results.json").read_text())
    assert training <= results.keys() and training <= finetuned.keys()
    # every row the student asked for was just computed for the text query above: the service's
    # cache (keyed by token ids, so text and token-id inputs share it) answered all of them
    assert results["flops"]["teacher_flops_spent"] == 0


def test_seeded_runs_are_identical_and_files_with_string_labels_work(
    base_model: Path, tmp_path: Path
) -> None:
    train = tmp_path / "train.csv"
    train.write_text(
        "review,verdict\ngood film,yes\nbad film,no\nfun story,yes\nawful plot,no\n", encoding="utf-8"
    )
    common = dict(
        model_name_or_path=str(base_model),
        train_file=str(train),
        validation_file=str(train),
        text_columns="review",
        label_column="verdict",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        disable_tqdm=True,
        seed=7,
    )
    first = finetune(FinetuneArguments(output_dir=str(tmp_path / "a"), **common))
    finetune(FinetuneArguments(output_dir=str(tmp_path / "b"), **common))
    weights_a = load_safetensors(tmp_path / "a" / "model.safetensors")
    weights_b = load_safetensors(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["id2label"] == {"0": "no", "1": "yes"} and config["num_hidden_layers"] == 4
    assert first["global_step"] == 3 and first["eval_samples"] == 4


def resumable_options(synthetic_dir: Path, base_model: Path, **extra: object) -> dict:
    """2.5 epochs of 8 steps (128 rows, batches of 16) with dropout: order and RNG both matter."""
    return dict(
        model_name_or_path=str(base_model), num_layers=2, task="synthetic", data_dir=str(synthetic_dir),
        max_seq_length=64, learning_rate=5e-3, num_train_epochs=2.5, per_device_train_batch_size=16,
        seed=0, disable_tqdm=True, **extra,
    )  # fmt: skip


def stop_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the ``Trainer`` raise (as a Ctrl-C would) as it starts step ``step``."""
    from transformers import Trainer

    calls, training_step = [0], Trainer.training_step

    def counting(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counting)


@pytest.mark.parametrize(
    ("save_steps", "stopped_at"),
    [(3, 12), (4, 11)],  # last save mid-epoch (step 9 of 20), or at an epoch's end (step 8)
)
def test_a_stopped_finetuning_resumes_to_the_weights_of_one_never_stopped(
    synthetic_dir: Path, base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    save_steps: int, stopped_at: int,
) -> None:  # fmt: skip
    whole = finetune(
        FinetuneArguments(output_dir=str(tmp_path / "whole"), **resumable_options(synthetic_dir, base_model))
    )
    out = tmp_path / "stopped"
    options = resumable_options(
        synthetic_dir,
        base_model,
        output_dir=str(out),
        save_strategy="steps",
        save_steps=save_steps,
        resume_from_checkpoint="auto",
    )
    with monkeypatch.context() as patch:
        stop_at_step(patch, stopped_at)
        with pytest.raises(KeyboardInterrupt):
            finetune(FinetuneArguments(**options))
    assert list_checkpoints(out) and not (out / "model.safetensors").exists()
    resumed = finetune(FinetuneArguments(**options))

    weights, expected = (
        load_safetensors(out / "model.safetensors"),
        load_safetensors(tmp_path / "whole" / "model.safetensors"),
    )
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert resumed["global_step"] == whole["global_step"] == 20
    assert resumed["eval_accuracy"] == whole["eval_accuracy"] and resumed["eval_loss"] == whole["eval_loss"]
    assert not list_checkpoints(out)  # removed once the teacher is saved


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give either --task"),
        (["--task", "nope", "--data_dir", "."], "unknown task 'nope'"),
        (["--task", "synthetic", "--data_dir", "SYN", "--num_layers", "9"], "num_layers=9 must be in 1..4"),
        (["--task", "synthetic", "--data_dir", "SYN", "--warmup_ratio", "-1"], "--warmup_steps must be >= 0"),
    ],
)
def test_bad_options_are_user_errors(
    base_model: Path, synthetic_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    extra = [str(synthetic_dir) if e == "SYN" else e for e in extra]
    args = parse(["--model_name_or_path", str(base_model), "--output_dir", str(tmp_path), *extra])
    with pytest.raises(UserError, match=message):
        args.func(args)


def test_a_metric_outside_the_choices_is_refused_before_anything_runs(
    synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--metric foo`` used to train to the end and fail when scoring; the parser refuses it now."""
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--task", "synthetic"]
    with pytest.raises(SystemExit) as exited:
        parse([*argv, "--data_dir", str(synthetic_dir), "--metric", "foo"])
    assert exited.value.code == 2
    assert "argument --metric: invalid choice: 'foo'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = pytest.importorskip("student_trainer.cli")
    try:
        cli.build_parser()
    except ImportError as err:  # another sub-command is not written yet
        pytest.skip(f"student-trainer CLI incomplete: {err}")
    missing = tmp_path / "no-such-model"
    argv = ["finetune", "--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "o")]
    argv += ["--train_file", str(tmp_path / "none.tsv")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"student-trainer finetune: error: no such directory: {missing}"  # before the data


def test_max_seq_length_beyond_the_model_is_capped_to_its_positions(base_model: Path, tmp_path: Path) -> None:
    train = tmp_path / "long.tsv"
    long_text = " ".join(["good film"] * 150)  # ~300 tokens; the tiny model has 128 positions
    train.write_text(f"sentence\tlabel\n{long_text}\t1\nbad\t0\n", encoding="utf-8")
    results = finetune(
        FinetuneArguments(
            model_name_or_path=str(base_model),
            output_dir=str(tmp_path / "out"),
            train_file=str(train),
            validation_file=str(train),
            max_seq_length=512,
            max_steps=1,
            per_device_train_batch_size=2,
            disable_tqdm=True,
        )
    )
    assert results["global_step"] == 1 and results["eval_samples"] == 2


def test_one_label_training_data_is_refused(base_model: Path, tmp_path: Path) -> None:
    train = tmp_path / "onelabel.tsv"
    train.write_text("sentence\tlabel\ngood movie\tpos\nfine film\tpos\n", encoding="utf-8")
    args = parse(["--model_name_or_path", str(base_model), "--output_dir", str(tmp_path / "o")])
    args.train_file = str(train)
    with pytest.raises(UserError, match=r"onelabel\.tsv: the training data has 1 distinct label"):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_a_resume_from_the_last_step_trains_no_step_more(
    synthetic_dir: Path, base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job stopped after its last checkpoint but before the teacher was saved, then started again: the
    ``Trainer`` alone would train one batch past ``max_steps`` (20 of 2.5 epochs ends mid-epoch)."""
    whole = finetune(
        FinetuneArguments(output_dir=str(tmp_path / "whole"), **resumable_options(synthetic_dir, base_model))
    )
    out = tmp_path / "stopped"
    options = resumable_options(
        synthetic_dir, base_model, output_dir=str(out), save_strategy="steps", save_steps=10,
        resume_from_checkpoint="auto",
    )  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr("student_trainer.train.finetune.save_teacher", interrupted)
        with pytest.raises(KeyboardInterrupt):
            finetune(FinetuneArguments(**options))
    assert list_checkpoints(out)[-1].name == "checkpoint-20"
    resumed = finetune(FinetuneArguments(**options))

    assert resumed["global_step"] == whole["global_step"] == 20
    weights, expected = (
        load_safetensors(out / "model.safetensors"),
        load_safetensors(tmp_path / "whole" / "model.safetensors"),
    )
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert resumed.keys() == whole.keys()


def interrupted(*args: object) -> None:
    raise KeyboardInterrupt
