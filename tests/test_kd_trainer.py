"""`DynamicKDTrainer`, the Python API: a Hugging Face `Trainer` whose loss is dynamic KD."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback

from shared.errors import UserError
from student_trainer import DynamicKDTrainer, KDConfig
from student_trainer.teachers.client import make_teacher_client
from student_trainer.train.checkpoint import checkpoint_problem
from student_trainer.train.errors import Interrupted, TeacherUnavailable
from tests.distill_support import REPO, FlakyTeacher, WrappedTeacher, save_student, write_sentences
from tests.kd_trainer_run import make_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_teachers: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kd_trainer")
    return {
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", 40, seed=1),
        "eval": write_sentences(root / "eval.tsv", 12, seed=2),
        **tiny_teachers,
    }


def trained_tensors(trainer: DynamicKDTrainer) -> dict[str, torch.Tensor]:
    """The student's weights and its projections."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_run(resumed: DynamicKDTrainer, reference: DynamicKDTrainer) -> None:
    final, expected = trained_tensors(resumed), trained_tensors(reference)
    assert final.keys() == expected.keys() and any(k.startswith("projections.") for k in final)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert resumed.ledger.totals == reference.ledger.totals  # the ledger carried over exactly
    assert resumed.state.global_step == reference.state.global_step == 12


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory: pytest.TempPathFactory) -> DynamicKDTrainer:
    """12 steps never stopped, a checkpoint every 4."""
    trainer = make_trainer(workspace, tmp_path_factory.mktemp("reference"))
    trainer.train()
    return trainer


def test_resuming_mid_epoch_gives_the_same_weights_as_a_run_never_stopped(
    workspace, reference, tmp_path: Path
) -> None:
    """checkpoint-8 is in the middle of the second epoch (5 batches each); checkpoint-12 is what a
    kill in the middle of writing it leaves (no trainer_state.json, written last): passed over."""
    shutil.copytree(Path(reference.args.output_dir) / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-12").mkdir()
    shutil.copy(Path(reference.args.output_dir) / "checkpoint-12" / "config.json", tmp_path / "checkpoint-12")
    resumed = make_trainer(workspace, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, reference)
    files = {p.name for p in (tmp_path / "checkpoint-12").iterdir()}
    assert {"model.safetensors", "projections.safetensors", "optimizer.pt", "kd_state.pt"} <= files


def test_a_teacher_that_stays_down_leaves_a_checkpoint_of_the_last_step_that_resumes_exactly(
    workspace, reference, tmp_path: Path
) -> None:
    """The failed step's dropout draws, row choice and ledger entries are put back before the
    checkpoint: resumed, the run is the one never stopped."""
    large = FlakyTeacher(make_teacher_client(f"local:{workspace['large']}", name="large"), answers=6)
    teachers = {"small": f"local:{workspace['small']}", "large": large}
    interrupted = make_trainer(workspace, tmp_path, teachers=teachers, save_steps=100)
    with pytest.raises(TeacherUnavailable, match=r"teacher 'large' failed.*stopped at step 6.*resumable"):
        interrupted.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    down = FlakyTeacher(make_teacher_client(f"local:{workspace['large']}", name="large"), answers=0)
    restarted = make_trainer(workspace, tmp_path, teachers={**teachers, "large": down}, save_steps=100)
    with pytest.raises(TeacherUnavailable, match=r"stopped at step 6 with a resumable checkpoint at .*-6 "):
        restarted.train(resume_from_checkpoint="auto")
    assert weights.stat().st_mtime_ns == written  # kept, not deleted and written again
    resumed = make_trainer(workspace, tmp_path, save_steps=100)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, reference)


class SignalAt(TrainerCallback):
    """Sends this process ``sig`` when step ``step`` begins, as a user's Ctrl-C or a scheduler would."""

    def __init__(self, sig: int, step: int):
        self.sig, self.step = sig, step

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_it_and_stops_and_resuming_is_exact(
    workspace, reference, tmp_path: Path, stop: int
) -> None:
    interrupted = make_trainer(workspace, tmp_path)
    interrupted.add_callback(SignalAt(stop, step=3))
    with pytest.raises(Interrupted, match=rf"interrupted at step 3, after a checkpoint in {tmp_path} "):
        interrupted.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    assert signal.getsignal(stop) != interrupted.stop.signals._note  # the handlers are put back
    resumed = make_trainer(workspace, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, reference)


class CountingTeacher(WrappedTeacher):
    def __init__(self, real):
        super().__init__(real)
        self.rows: list[int] = []

    async def infer(self, query):
        self.rows.append(int(query.input_ids.shape[0]))
        return await self.real.infer(query)


def test_gradient_accumulation_asks_and_counts_each_teacher_row_once(workspace, tmp_path: Path) -> None:
    small = CountingTeacher(make_teacher_client(f"local:{workspace['small']}", name="small"))
    kd = KDConfig(teacher_selection="small", data_selection="entropy", selection_ratio=0.5)
    trainer = make_trainer(
        workspace, tmp_path, kd, {"small": small}, max_steps=3, gradient_accumulation_steps=2, save_steps=100
    )
    trainer.train()
    assert trainer.state.global_step == 3
    # one epoch of 5 batches of 8 in 3 steps (2 + 2 + 1 batches): half of each batch sent, once
    assert small.rows == [4] * 5
    totals = trainer.ledger.totals
    assert totals["teacher_rows_small"] == 20 and totals["teacher_requests"] == 5
    assert totals["instances"] == 40
    assert trainer.state.total_flos == trainer.ledger.summary()["student_flops"] > 0  # the model card's
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    assert all(entry["selection_share"] == 0.5 for entry in logged)


def test_report_to_tensorboard_shows_the_kd_metrics_beside_the_loss(workspace, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kd = KDConfig(teacher_selection="large", data_selection="margin", selection_ratio=0.25)
    trainer = make_trainer(workspace, tmp_path, kd, max_steps=3, report_to=["tensorboard"], save_steps=100)
    trainer.train()
    trainer.end()
    (run,) = {event.parent for event in tmp_path.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    kd_tags = {
        "train/teacher_flops_spent",
        "train/teacher_flops_vanilla",
        "train/selection_share",
        "train/kd",
    }
    assert {"train/loss", "train/learning_rate"} | kd_tags <= tags
    spent = events.Scalars("train/teacher_flops_spent")
    assert [s.step for s in spent] == [1, 2, 3] and spent[-1].value == pytest.approx(
        trainer.ledger.teacher_flops
    )
    assert all(s.value == 0.25 for s in events.Scalars("train/selection_share"))


def test_evaluation_asks_no_teacher_and_the_saved_student_is_a_plain_model(workspace, tmp_path: Path) -> None:
    large = CountingTeacher(make_teacher_client(f"local:{workspace['large']}", name="large"))
    kd = KDConfig(teacher_selection="large", supervision="pkd")  # wider than the student: a projection
    trainer = make_trainer(workspace, tmp_path, kd, {"large": large}, max_steps=2, save_steps=100)
    trainer.train()
    asked = len(large.rows)
    scores = trainer.evaluate()
    assert len(large.rows) == asked and scores["eval_loss"] > 0
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    for name, tensor in trainer.student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (tmp_path / "final" / "projections.safetensors").is_file()  # beside it, not in it


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ("soft", r"teacher_selection 'soft' needs two or more teachers, got \['small'\]"),
        ("large", r"teacher_selection 'large' is none of the teachers given \['small'\]"),
    ],
)
def test_a_method_without_its_teachers_is_a_one_line_error(workspace, tmp_path, selection, message) -> None:
    with pytest.raises(UserError, match=message):
        make_trainer(workspace, tmp_path, KDConfig(teacher_selection=selection), {"small": "local:/nowhere"})


def test_the_example_script_trains_with_accumulation_and_logs_kd_metrics_to_tensorboard(
    workspace, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = REPO / "examples" / "hf_trainer_dynamic_kd.py"
    output = tmp_path / "out"
    argv = [str(workspace["student"]), f"local:{workspace['large']}", str(workspace["train"]), str(output)]
    done = subprocess.run(
        [sys.executable, str(script), *argv], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert AutoModelForSequenceClassification.from_pretrained(output).config.num_hidden_layers == 3
    (run,) = {event.parent for event in output.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    spent = events.Scalars("train/teacher_flops_spent")
    assert [s.step for s in spent] == [1, 2, 3, 4] and spent[0].value > 0
    assert {s.value for s in events.Scalars("train/selection_share")} == {0.5}
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][-1]["step"] == 4


def test_two_processes_under_torchrun_train_like_one_with_the_union_batch(workspace, tmp_path: Path) -> None:
    """Rank r's k-th batch of 4 is half of the one process's k-th batch of 8 (the same shuffled
    order): averaged gradients give the same weights and projections up to float rounding, and the
    ledgers, summed over the ranks, count the same rows. Dropout is off so neither run draws anything
    random. The projections run inside the student's forward, where DistributedDataParallel sees them."""
    student = save_student(tmp_path / "student", dropout=0.0)
    spec = {
        "workspace": {key: str(workspace[key]) for key in ("train", "large")} | {"student": str(student)},
        "kd": {"teacher_selection": "large", "supervision": "pkd"},  # with a projection to width 48
        "teachers": ["large"],
        "training": {"max_steps": 4, "save_strategy": "no"},
    }
    script = [str(REPO / "tests" / "kd_trainer_run.py")]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher, batch in (
        ("single", [sys.executable], 8),
        ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 4),
    ):
        spec["output_dir"] = str(tmp_path / name)
        spec["training"]["per_device_train_batch_size"] = batch
        done = subprocess.run(
            [*launcher, *script, json.dumps(spec)], cwd=REPO, env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "run.json").read_text())
    assert runs["ddp"]["world_size"] == 2
    single, ddp = runs["single"]["ledger"], runs["ddp"]["ledger"]
    for key in ("instances", "teacher_rows_large", "requested_flops_large", "vanilla_unpadded_flops_large"):
        assert ddp[key] == single[key] > 0, key
    initial = AutoModelForSequenceClassification.from_pretrained(student).state_dict()
    expected, got = (
        {
            **AutoModelForSequenceClassification.from_pretrained(tmp_path / name / "final").state_dict(),
            **load_file(str(tmp_path / name / "final" / "projections.safetensors")),
        }
        for name in ("single", "ddp")
    )
    assert any(name.startswith("large.") for name in expected)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=2e-5), name
    moved = [n for n in initial if n in expected and not torch.allclose(initial[n], expected[n], atol=1e-4)]
    assert len(moved) > 10  # training did change the weights, so the comparison means something


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing_half_written(
    workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while checkpoint-8's optimizer.pt is written (part of it is): the error says so
    in one line, checkpoint-8 is gone, checkpoint-4 is byte for byte what it was."""
    trainer = make_trainer(workspace, tmp_path)
    save = torch.save

    def fills_the_disk(obj, file, *args, **kwargs):
        if str(file).endswith("optimizer.pt") and trainer.state.global_step == 8:
            Path(file).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    before: dict[str, bytes] = {}
    trainer.add_callback(OnStep(4, lambda: before.update(folder_bytes(tmp_path / "checkpoint-4")), "on_save"))
    with pytest.raises(UserError, match=r"^no space left on device while writing checkpoint-8: ") as raised:
        trainer.train()
    assert "\n" not in str(raised.value) and "checkpoint-4 is the last good checkpoint" in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert folder_bytes(tmp_path / "checkpoint-4") == before


class OnStep(TrainerCallback):
    """Calls ``act`` at the ``event`` of step ``step``."""

    def __init__(self, step: int, act, event: str = "on_step_end"):
        self.step, self.act = step, act
        setattr(self, event, self._maybe)

    def _maybe(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            self.act()


def test_a_non_finite_loss_stops_before_the_optimizer_step_and_writes_nothing(
    workspace, tmp_path: Path
) -> None:
    """A weight turned NaN after step 5 (as a damaged checkpoint would make it): step 6's loss is NaN
    and the run stops there, its optimizer step not taken, checkpoint-4 the last one."""
    trainer = make_trainer(workspace, tmp_path)
    after_step_5: dict[str, torch.Tensor] = {}

    def poison() -> None:
        trainer.student.classifier.weight.data[0, 0] = float("nan")
        after_step_5.update(trained_tensors(trainer))

    trainer.add_callback(OnStep(5, poison))
    with pytest.raises(
        UserError, match=r"^the training loss is nan at step 6: stopped before the optimizer step"
    ):
        trainer.train()
    assert trainer.state.global_step == 5
    for name, tensor in trained_tensors(trainer).items():
        assert torch.equal(tensor.nan_to_num(7.0), after_step_5[name].nan_to_num(7.0)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_what_a_run_killed_while_writing_a_checkpoint_left_is_removed_when_the_next_starts(
    workspace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    staging = tmp_path / ".tmp-checkpoint-8"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "checkpoint-8").symlink_to(staging.name, target_is_directory=True)
    trainer = make_trainer(workspace, tmp_path, max_steps=2, save_steps=100)
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert "removed .tmp-checkpoint-8: a checkpoint that a stopped run did not finish writing" in (
        capsys.readouterr().err
    )


def test_checkpoints_are_whole_rotated_and_the_best_one_recorded_under_its_final_name(
    workspace, tmp_path: Path
) -> None:
    """Every file of a checkpoint is in its checksums; save_total_limit and load_best_model_at_end
    work as the Trainer's own (the folder being written is a link to its .tmp- folder meanwhile)."""
    trainer = make_trainer(
        workspace,
        tmp_path,
        eval_strategy="steps",
        eval_steps=4,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path and not best.is_symlink() and best.is_dir()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 2 and {best.name, "checkpoint-12"} <= set(kept)  # rotated, the best one kept
    for name in kept:
        listed = (tmp_path / name / "checksums.sha256").read_text().splitlines()
        assert sorted(line.split("  ")[1] for line in listed) == sorted(
            p.name for p in (tmp_path / name).iterdir() if p.name != "checksums.sha256"
        )
        assert checkpoint_problem(tmp_path / name) is None
    saved = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    assert saved["best_model_checkpoint"] == str(best)
