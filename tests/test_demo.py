"""The demo end to end on a tiny random BERT: experiments/demo.yaml shrunk, through the experiment
runner (fine-tune, serve, distil), then the demo's report of what the runner wrote."""

from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.cli import main
from student_trainer.demo import collect_report, format_report, run_demo, run_layout
from student_trainer.experiments.config import load_experiment
from tests.distill_support import REPO, tiny_demo_config
from tests.tiny_models import save_tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = save_tiny_bert(root / "bert", num_layers=6, hidden_size=32, seed=3)
    config = tiny_demo_config(root / "demo.yaml", base, data_dir=root / "data")
    return config, root / "work", run_demo(config, work_dir=root / "work")


def test_demo_runs_every_stage_and_reports_real_numbers(demo):
    _, work, report = demo
    (info,) = report["tasks"].values()
    assert list(report["tasks"]) == ["synthetic"]
    assert {role: t["num_layers"] for role, t in info["teachers"].items()} == {"small": 3, "large": 6}
    assert all(t["fine_tuned_now"] for t in info["teachers"].values())
    (run,) = info["runs"]
    assert run["layers"] == 1 and 0.0 <= run["eval"]["eval_accuracy"] <= 1.0
    flops = run["flops"]
    # hard routing at r = 0.5: each instance selected goes to one teacher only, vs both on all for vanilla
    assert 0 < flops["teacher_flops_spent"] < 0.5 * flops["teacher_flops_vanilla"]
    # the service itself computed exactly the selected rows: int(32 * 0.5) per full batch, split in halves
    assert sum(info["served_rows"].values()) == 3 * 16
    # dynamic KD's own share, cache and padding aside: the rows sent, each to one teacher, at real lengths
    assert 0 < flops["teacher_flops_requested"] < 0.5 * flops["teacher_flops_vanilla_unpadded"]
    assert flops["teacher_flops_saved_by_method"] > 0.5
    run_dir = Path(report["results_dir"]).parent
    assert run_dir.parent == work / "runs"  # a folder of its own per demo run, the student kept in it
    assert (run_dir / "work" / "runs" / "synthetic" / run["method"] / "seed42" / "model.safetensors").exists()
    text = format_report(report)
    assert text.index("saved by dynamic KD's choices") < text.index("saved by the service")
    assert "rows computed by the service: large " in text and "(fine-tuned now)" in text


def test_second_run_reuses_cached_teachers_and_distils_again(demo, capsys):
    config, work, first = demo
    teachers = sorted(p.name for p in (work / "teachers").iterdir())
    report = run_demo(config, work_dir=work)
    (info,) = report["tasks"].values()
    assert not any(t["fine_tuned_now"] for t in info["teachers"].values())
    assert "fine-tuning" not in capsys.readouterr().out
    assert sorted(p.name for p in (work / "teachers").iterdir()) == teachers
    assert report["results_dir"] != first["results_dir"]  # the student ran again, in a folder of its own
    assert info["runs"][0]["eval"] == first["tasks"]["synthetic"]["runs"][0]["eval"]  # the same numbers
    assert "(reused from cache)" in format_report(report)


def test_a_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing"), "--work_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_a_stopped_demo_resumes_in_its_folder_and_a_finished_one_starts_anew(tmp_path):
    config = load_experiment(REPO / "experiments" / "demo.yaml")
    first = run_layout(config, tmp_path)
    assert run_layout(config, tmp_path) == first  # its run not done: the same command resumes it
    ((task, method, seed),) = config.runs()
    first.save_run(task, method.name, seed, results={})
    second = run_layout(config, tmp_path)
    assert second.results.parent != first.results.parent and second.teachers == first.teachers
    assert run_layout(config, tmp_path) == second


def test_an_unfinished_run_is_a_one_line_error_not_a_trace(tmp_path):
    config = load_experiment(REPO / "experiments" / "demo.yaml")
    layout = run_layout(config, tmp_path)
    ((task, method, seed),) = config.runs()
    with pytest.raises(UserError, match=rf"^run {task}/{method.name}/seed{seed} is unfinished \(no ") as err:
        collect_report(config, layout, started_at=0.0)
    assert "\n" not in str(err.value) and "run the demo again to resume it" in str(err.value)
    layout.save_run(task, method.name, seed, run={"wall_time_s": 3.0}, results=finished_results())
    (run,) = collect_report(config, layout, started_at=0.0)["tasks"][task]["runs"]
    assert (run["method"], run["seed"], run["layers"], run["wall_time_s"]) == (method.name, seed, 2, 3.0)


def finished_results() -> dict:
    return {"student_layers": 2, "eval": {"eval_accuracy": 0.5}, "flops": {}, "train_runtime_s": 1.0}
