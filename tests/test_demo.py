"""The demo's pipeline end to end on a tiny random BERT: fine-tune, serve, distil, report."""

import json
from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.cli import main
from student_trainer.demo import DemoSettings, format_report, run_demo
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    base = save_tiny_bert(tmp_path_factory.mktemp("base") / "bert", num_layers=6, hidden_size=32, seed=3)
    settings = DemoSettings(
        base_model=str(base),
        work_dir=str(tmp_path_factory.mktemp("demo")),
        num_train=96,
        num_dev=32,
        teacher_epochs_scale=0.5,
        student_epochs=1,
        student_layers=1,
        max_seq_length=32,
    )
    return settings, run_demo(settings)


def test_demo_runs_every_stage_and_reports_real_numbers(demo_report, capsys):
    settings, report = demo_report
    assert report["task"] == "synthetic"
    assert set(report["teachers"]) == {"small", "large"}
    assert 0.0 <= report["student"]["eval"]["eval_accuracy"] <= 1.0
    flops = report["flops"]
    # hard routing at r = 0.5: each instance selected goes to one teacher only, vs both on all for vanilla
    assert 0 < flops["teacher_flops_spent"] < 0.5 * flops["teacher_flops_vanilla"]
    # the service itself computed exactly the selected rows: int(32 * 0.5) per full batch, split in halves
    assert sum(report["served_rows"].values()) == 3 * 16
    saved = json.loads((Path(report["run_dir"]) / "demo_report.json").read_text())
    assert saved["flops"] == flops
    # dynamic KD's own share, cache and padding aside: the rows sent, each to one teacher, at real lengths
    assert 0 < flops["teacher_flops_requested"] < 0.5 * flops["teacher_flops_vanilla_unpadded"]
    assert flops["teacher_flops_saved_by_method"] > 0.5
    text = format_report(report)
    assert text.index("saved by dynamic KD's choices") < text.index("saved by the service")


def test_second_run_reuses_cached_teachers(demo_report):
    settings, _ = demo_report
    report = run_demo(settings)
    assert all(t["reused"] for t in report["teachers"].values())


def test_bad_data_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        run_demo(DemoSettings(data=str(tmp_path / "missing"), base_model="unused", work_dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("option", "value"), [("num_train", "0"), ("selection_ratio", "1.5"), ("port", "70000")]
)
def test_impossible_settings_are_one_line_errors(option, value, capsys):
    assert main(["demo", f"--{option}", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--{option} must be" in err[0]
