"""An experiment's data: ``--data [TASK=]DIR`` instead of the file's tasks, and a task ``generate``
writes (the synthetic one) before anything reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import UserError
from student_trainer.data.readers import load_task
from student_trainer.experiments.config import GENERATORS, parse_config
from student_trainer.experiments.tasks import generate_data


def raw_config(**tasks: dict) -> dict:
    return {"name": "x", "tasks": tasks, "seeds": [1], "student": {"model": "m"},
            "teachers": {"large": {"model": "m"}}, "methods": [{"name": "kd", "args": {}}]}  # fmt: skip


def test_data_replaces_the_files_tasks_naming_each_by_its_folder(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "mine").mkdir()
    tasks = {"sst2": {"data_dir": "elsewhere", "max_train_samples": 8}, "synthetic": {"data_dir": "s"}}
    config = parse_config(raw_config(**tasks), data=[str(tmp_path / "SST-2"), f"sst5={tmp_path / 'mine'}"])
    assert config.tasks == {
        "sst2": {"data_dir": str(tmp_path / "SST-2"), "max_train_samples": 8},  # its other keys kept
        "sst5": {"data_dir": str(tmp_path / "mine")},
    }


def test_data_that_names_no_folder_or_no_task_is_an_error(tmp_path: Path) -> None:
    synthetic = {"synthetic": {"data_dir": "s"}}
    with pytest.raises(UserError, match="is not a directory"):
        parse_config(raw_config(**synthetic), data=[str(tmp_path / "missing")])
    with pytest.raises(UserError, match="unknown task 'nosuchtask'"):
        parse_config(raw_config(**synthetic), data=[f"nosuchtask={tmp_path}"])


def test_data_in_place_of_a_generated_task_drops_generate(tmp_path: Path) -> None:
    generated = {"synthetic": {"data_dir": "s", "generate": {"num_train": 8, "num_dev": 4}}}
    config = parse_config(raw_config(**generated), data=[f"synthetic={tmp_path}"])
    assert config.tasks == {"synthetic": {"data_dir": str(tmp_path)}}


@pytest.mark.parametrize(
    ("task", "generate", "message"),
    [
        ("sst2", {"num_train": 8, "num_dev": 4}, "only synthetic is generated"),
        ("synthetic", {"num_train": 0, "num_dev": 4}, "num_train: a positive number of rows"),
        ("synthetic", {"num_train": 8, "num_dev": 4, "noise": 0.1}, "a mapping of num_train, num_dev, seed"),
    ],
)
def test_a_bad_generate_is_a_one_line_error(task: str, generate: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_config(raw_config(**{task: {"data_dir": "d", "generate": generate}}))


def test_generate_writes_once_again_when_its_numbers_change_and_never_over_other_data(tmp_path: Path) -> None:
    folder = tmp_path / "synthetic"
    config = parse_config(
        raw_config(synthetic={"data_dir": str(folder), "generate": {"num_train": 8, "num_dev": 4}})
    )
    assert config.task_flags("synthetic") == {"data_dir": str(folder)}  # what distill is given
    generate_data(config.tasks)
    assert len(load_task("synthetic", folder, "train").examples) == 8
    written = (folder / "train.tsv").stat().st_mtime_ns
    generate_data(config.tasks)
    assert (folder / "train.tsv").stat().st_mtime_ns == written  # the same numbers: left as it is
    generate_data({"synthetic": {"data_dir": str(folder), "generate": {"num_train": 12, "num_dev": 4}}})
    assert len(load_task("synthetic", folder, "train").examples) == 12
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train.tsv").write_text("sentence\tlabel\nmine\t1\n")
    with pytest.raises(UserError, match="holds other data"):
        generate_data({"synthetic": {"data_dir": str(theirs), "generate": {"num_train": 8, "num_dev": 4}}})
    assert (theirs / "train.tsv").read_text() == "sentence\tlabel\nmine\t1\n"


def test_a_generation_cut_short_is_redone_not_taken_for_other_data(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "synthetic"
    tasks = {"synthetic": {"data_dir": str(folder), "generate": {"num_train": 8, "num_dev": 4}}}

    def killed_after_train_tsv(output_dir, **spec):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "train.tsv").write_text("sentence\tlabel\nhalf\t1\n")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setitem(GENERATORS, "synthetic", killed_after_train_tsv)
        with pytest.raises(KeyboardInterrupt):
            generate_data(tasks)
    generate_data(tasks)  # "holds other data" before: the tsv it wrote had no marker yet
    assert len(load_task("synthetic", folder, "train").examples) == 8
