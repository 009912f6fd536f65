"""`distill` and `finetune` options: HF names on the command line, the same keys in YAML, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.args.distill import DistillArguments, parse_distill_args
from student_trainer.args.finetune import FinetuneArguments
from student_trainer.cli import main as cli_main

BASE = ["--model_name_or_path", "bert", "--output_dir", "out", "--task", "sst2", "--data_dir", "data"]


def test_command_line_uses_hugging_face_names_and_types() -> None:
    args = parse_distill_args(
        BASE
        + ["--learning_rate", "3e-5", "--num_train_epochs", "2.5", "--per_device_train_batch_size", "16"]
        + ["--teacher", "large=http://127.0.0.1:8000", "--data_selection", "entropy"]
        + [
            "--selection_ratio",
            "0.3",
            "--exact_budget",
            "--supervision",
            "pkd",
            "--pt_features",
            "all-tokens",
        ]
    )
    assert args.learning_rate == 3e-5 and args.num_train_epochs == 2.5
    assert args.per_device_train_batch_size == 16
    assert args.teachers == {"large": "http://127.0.0.1:8000"}
    assert args.teacher_selection == "large"  # the only teacher given
    assert args.teacher_roles == ("large",)
    assert args.exact_budget and args.uses_hidden_states
    steps = parse_distill_args(BASE + ["--no_kd", "--eval_strategy", "steps", "--logging_steps", "7"])
    assert steps.eval_steps == steps.logging_steps == 7  # HF default: eval_steps follows logging_steps


def test_defaults_follow_training_arguments() -> None:
    defaults = DistillArguments()
    assert (defaults.learning_rate, defaults.per_device_train_batch_size, defaults.seed) == (5e-5, 8, 42)
    assert (defaults.max_steps, defaults.warmup_steps, defaults.lr_scheduler_type) == (-1, 0, "linear")


def test_two_teachers_route_by_method() -> None:
    two = ["--teacher", "small=local:/s", "--teacher", "large=local:/l"]
    assert parse_distill_args(BASE + two + ["--teacher_selection", "hard"]).teacher_roles == (
        "small",
        "large",
    )
    assert parse_distill_args(BASE + two + ["--teacher_selection", "small"]).teacher_roles == ("small",)
    assert parse_distill_args(BASE + two + ["--no_kd"]).teacher_roles == ()


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_holds_the_same_keys_and_the_command_line_wins(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path,
        """
model_name_or_path: bert
output_dir: out
task: sst2
data_dir: data
learning_rate: 2e-5          # YAML reads this as a string; it must still be a float
num_train_epochs: 4
teacher:
  small: local:/teachers/small
  large: http://127.0.0.1:8000,http://127.0.0.1:8001
teacher_selection: soft
selection_ratio: 0.5
data_selection: margin
exact_budget: true
""",
    )
    args = parse_distill_args(["--config", str(config), "--selection_ratio", "0.25"])
    assert args.learning_rate == 2e-5 and args.num_train_epochs == 4.0
    assert args.teachers == {
        "small": "local:/teachers/small",
        "large": "http://127.0.0.1:8000,http://127.0.0.1:8001",
    }
    assert args.selection_ratio == 0.25  # the flag beats the file
    assert args.data_selection == "margin" and args.exact_budget


def test_yaml_teacher_list_form(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "teacher: [small=local:/a]\n")
    assert parse_distill_args(BASE + ["--config", str(config)]).teachers == {"small": "local:/a"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 1e-4\n", "unknown key 'learning_rat'"),
        ("max_steps: many\n", "key 'max_steps' must be int"),
        ("no_kd: 3\n", "key 'no_kd' must be bool"),
        ("[1, 2]\n", "must be a mapping"),
        ("a: [\n", "not valid YAML"),
        ("per_device_train_batch_size:\n", "key 'per_device_train_batch_size' has no value; it must be int"),
        ("text_columns:\n", "key 'text_columns' has no value; it must be str"),
        ("teacher:\n  small:\n", "key 'teacher' must be str, got None"),
    ],
)
def test_bad_yaml_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = write_yaml(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        parse_distill_args(BASE + ["--teacher", "small=local:/a", "--config", str(config)])
    assert str(info.value).startswith(str(config))


def test_yaml_values_obey_the_flags_choices(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "supervision: magic\n")
    with pytest.raises(UserError, match="--supervision must be one of"):
        parse_distill_args(BASE + ["--teacher", "small=local:/a", "--config", str(config)])


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config"):
        parse_distill_args(BASE + ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --teacher small=SPEC and/or --teacher large=SPEC, or --no_kd"),
        (["--teacher", "hard=local:/a"], "NAME=SPEC"),  # a method's name, not a teacher's
        (["--teacher", "me dium=local:/a"], "NAME=SPEC"),
        (["--teacher", "local:/a"], "NAME=SPEC"),
        (["--teacher", "small=local:/a", "--teacher_selection", "biggest"], "must be a teacher given"),
        (["--teacher", "a=local:/a", "--teacher_selection", "soft"], "needs --teacher small=SPEC"),
        (["--teacher", "a=local:/a", "--teacher_budget", "10%"], "needs --data_selection"),
        (["--teacher", "a=local:/a", "--data_selection", "lc", "--teacher_budget", "2XF"], "takes FLOPs"),
        (["--teacher", "a=local:/a", "--data_selection", "lc", "--teacher_budget", "0%"], r"in \(0, 100\]"),
        (
            [
                "--teacher",
                "a=local:/a",
                "--data_selection",
                "lc",
                "--teacher_budget",
                "1TF",
                "--exact_budget",
            ],
            "replaces --selection_ratio",
        ),
        (["--no_kd", "--teacher_budget", "1TF"], "cannot go with --no_kd"),
        (["--teacher", "small=local:/a", "--teacher", "small=local:/b"], "given twice"),
        (["--teacher", "small=local:/a", "--teacher", "large=local:/b"], "choose --teacher_selection"),
        (["--teacher", "small=local:/a", "--teacher_selection", "hard"], "needs --teacher large=SPEC"),
        (["--teacher", "small=local:/a", "--selection_ratio", "1.5"], "selection_ratio must be in"),
        (["--teacher", "small=local:/a", "--temperature", "0"], "temperature must be > 0"),
        (["--teacher", "small=local:/a", "--selection_ratio", "0.5"], "needs --data_selection"),
        (["--no_kd", "--student_num_layers", "0"], r"--student_num_layers\) must be >= 1"),
        (["--no_kd", "--eval_strategy", "steps", "--eval_steps", "0"], "--eval_steps must be > 0, got 0"),
        (["--no_kd", "--save_steps", "0"], "--save_steps must be > 0"),
        (["--no_kd", "--logging_steps", "-1"], "--logging_steps must be > 0"),
        (["--no_kd", "--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),
        (["--no_kd", "--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
        (["--no_kd", "--adam_epsilon=-1e-8"], "--adam_epsilon must be >= 0"),
        (["--no_kd", "--adam_beta1", "1"], r"--adam_beta1 must be in \[0, 1\)"),
        (["--no_kd", "--adam_beta2", "-0.5"], r"--adam_beta2 must be in \[0, 1\)"),
        (["--no_kd", "--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    ],
)
def test_contradictions_are_rejected_with_a_reason(extra: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_distill_args(BASE + extra)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--output_dir", "o", "--task", "sst2", "--data_dir", "d", "--no_kd"],
            "--model_name_or_path is required",
        ),
        (
            ["--model_name_or_path", "m", "--task", "sst2", "--data_dir", "d", "--no_kd"],
            "--output_dir is required",
        ),
        (["--model_name_or_path", "m", "--output_dir", "o", "--no_kd"], "either --task"),
        (
            ["--model_name_or_path", "m", "--output_dir", "o", "--task", "sst2", "--no_kd"],
            "--task needs --data_dir",
        ),
    ],
)
def test_required_options(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_distill_args(argv)


def test_unknown_choice_on_the_command_line_is_an_argparse_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_distill_args(BASE + ["--data_selection", "biggest"])
    assert info.value.code == 2
    assert "invalid choice: 'biggest'" in capsys.readouterr().err


def test_a_ladder_of_named_teachers() -> None:
    three = ["--teacher", "mid=local:/b", "--teacher", "tiny=local:/a", "--teacher", "big=local:/c"]
    args = parse_distill_args(BASE + three + ["--teacher_selection", "hard"])
    assert args.teacher_roles == ("mid", "tiny", "big")  # the command line's order until FLOPs order them
    assert parse_distill_args(BASE + three + ["--teacher_selection", "tiny"]).teacher_roles == ("tiny",)
    budget = parse_distill_args(BASE + three + ["--teacher_selection", "soft", "--data_selection", "entropy",
                                                "--teacher_budget", "2.5TF"])  # fmt: skip
    assert budget.kd.budget.flops == 2_500_000_000_000


def test_optional_yaml_keys_may_be_left_empty(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "max_train_samples:\neval_steps:\n")
    args = parse_distill_args(BASE + ["--no_kd", "--config", str(config)])
    assert args.max_train_samples is None and args.eval_steps is None


def test_output_dir_must_not_be_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    base = ["--model_name_or_path", "m", "--task", "sst2", "--data_dir", "d", "--no_kd"]
    for output_dir in (afile, afile / "run1"):
        with pytest.raises(UserError, match=rf"--output_dir {re.escape(str(output_dir))}: .*afile is a file"):
            parse_distill_args(base + ["--output_dir", str(output_dir)])
        with pytest.raises(UserError, match=r"afile is a file"):
            FinetuneArguments(model_name_or_path="m", output_dir=str(output_dir), task="sst2").validate()
    assert parse_distill_args(base + ["--output_dir", str(tmp_path / "new" / "run")]).output_dir


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learning_rate": -1.0}, "--learning_rate must be > 0"),
        ({"weight_decay": -0.01}, "--weight_decay must be >= 0"),
        ({"max_grad_norm": -1.0}, "--max_grad_norm must be >= 0"),
        ({"logging_steps": 0}, "--logging_steps must be > 0"),
        ({"per_device_eval_batch_size": 0}, "--per_device_eval_batch_size must be > 0"),
        ({"num_train_epochs": 0.0}, "--num_train_epochs must be > 0"),
    ],
)
def test_finetune_options_share_the_checks(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        FinetuneArguments(
            model_name_or_path="m", output_dir=str(tmp_path / "o"), task="sst2", **options
        ).validate()


@pytest.mark.parametrize("command", ["distill", "finetune"])
@pytest.mark.parametrize("path", ["./not/there", "not/there/either", "~/not-there-x9"])
def test_a_misspelt_model_path_is_one_line_naming_the_folder(
    command: str, path: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Not "Repo id must be in the form 'namespace/repo_name'": a path is a path."""
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\na b\t0\nc d\t1\n")
    argv = [
        command,
        "--model_name_or_path",
        path,
        "--train_file",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli_main(argv + (["--no_kd"] if command == "distill" else [])) == 2
    err = capsys.readouterr().err
    assert err == f"student-trainer {command}: error: no such directory: {path}\n"


def test_a_hub_repo_id_is_not_taken_for_a_path(tmp_path: Path) -> None:
    """``namespace/name`` stays a repo id: only a path-only shape is refused up front."""
    argv = ["--model_name_or_path", "org/name", "--task", "sst2", "--data_dir", "d", "--no_kd"]
    assert parse_distill_args(argv + ["--output_dir", str(tmp_path)]).model_name_or_path == "org/name"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(
        UserError, match=r"^not a directory: .*afile \(give the folder holding config.json\)$"
    ):
        parse_distill_args(["--model_name_or_path", str(tmp_path / "afile"), *argv[2:], "--output_dir", "o"])
