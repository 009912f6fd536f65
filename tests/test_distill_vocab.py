"""A teacher with its own vocabulary (a tiny MPNet) distils into a BERT student: the trainer sends
the selected rows' raw text (HTTP and ``local:``), the ledger counts the teacher's own tokens, a
same-vocabulary teacher still gets token ids, and what cannot work is refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shared.errors import UserError
from shared.flops import encoder_forward_flops
from shared.teacher_api import TeacherInfo, TeacherQuery, TextQuery
from shared.vocabulary import vocab_sha256
from student_trainer.kd.ledger import teacher_flops_config
from student_trainer.teachers.client import make_teacher_client
from student_trainer.train import setup as distill_setup
from student_trainer.train.student import text_teachers
from teacher_server.config import ServerConfig
from tests.distill_support import (
    WrappedTeacher,
    distill_argv,
    run_cli,
    run_in_process,
    save_student,
    train_log,
    write_sentences,
)
from tests.test_server_http import LiveServer
from tests.tiny_families import save_tiny_family, save_tiny_mpnet

ROWS, BATCH = 24, 8  # --max_steps 3: one epoch, every row sent once (--data_selection none)
SPELLED_OUT = ("movie", "film", "story", "plot", "acting", "boring", "awful")  # not in the teacher's words


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "student": save_student(root / "student"),
        "train": write_sentences(root / "train.tsv", ROWS, seed=11, min_words=3, max_words=14),
        "mpnet": save_tiny_mpnet(root / "mpnet", num_labels=2, without=SPELLED_OUT),
    }


@pytest.fixture(scope="module")
def server(workspace, tiny_teachers):
    config = ServerConfig(
        teachers=[
            {"name": "mpnet", "path": str(workspace["mpnet"]), "max_queue_delay_ms": 0},
            {"name": "bert", "path": str(tiny_teachers["large"]), "max_queue_delay_ms": 0},
        ]
    )
    with LiveServer(config) as live:
        yield live


def recorded(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every query the trainer's teacher clients send."""
    queries: list[object] = []

    class Recording(WrappedTeacher):
        async def infer(self, query):
            queries.append(query)
            return await self.real.infer(query)

    monkeypatch.setattr(
        distill_setup,
        "make_teacher_client",
        lambda spec, name, **options: Recording(make_teacher_client(spec, name=name, **options)),
    )
    return queries


def sentences(workspace) -> list[str]:
    return [line.split("\t")[0] for line in workspace["train"].read_text().splitlines()[1:]]


def lengths(workspace, model: str) -> list[int]:
    """Each training sentence's length in ``model``'s own tokens."""
    encoded = AutoTokenizer.from_pretrained(workspace[model])(sentences(workspace))
    return [len(ids) for ids in encoded["input_ids"]]


def argv(workspace, output: Path, spec: str, *extra: str) -> list[str]:
    method = ["--supervision", "pkd", "--pt_features", "cls", "--per_device_train_batch_size", str(BATCH)]
    return distill_argv(workspace["student"], workspace["train"], output, {"large": spec}, *method, *extra)


@pytest.mark.parametrize("backend", ["http", "local"])
def test_a_teacher_with_its_own_vocabulary_is_sent_text_and_counts_its_own_tokens(
    workspace, server, tmp_path, monkeypatch, backend
) -> None:
    queries = recorded(monkeypatch)
    spec = f"{server.url}#mpnet" if backend == "http" else f"local:{workspace['mpnet']}"
    served_before = server.metric("teacher_tokens_total", model="mpnet")
    results = run_in_process(argv(workspace, tmp_path / "out", spec))

    assert results["global_step"] == 3 and len(queries) == 3
    assert all(isinstance(q, TextQuery) and q.cls_layers and not q.token_layers for q in queries)
    assert sorted(text for q in queries for text in q.text) == sorted(sentences(workspace))
    teacher, student = lengths(workspace, "mpnet"), lengths(workspace, "student")
    assert sum(teacher) > sum(student)  # the spelled-out words: the teacher reads more tokens
    flops = results["flops"]
    assert flops["teacher_tokens_large"] == sum(teacher)
    assert flops["sent_student_tokens_large"] == sum(student)
    if backend == "http":  # the service itself tokenized and counted them
        assert server.metric("teacher_tokens_total", model="mpnet") - served_before == sum(teacher)
    info = results["teachers"]["large"]
    assert info["model_type"] == "mpnet"
    # requested: the rows at the teacher's own lengths (each answer's exact total split over its
    # rows), more than the student's lengths would cost; every row was sent, so vanilla (unpadded)
    # measured every row too and equals it
    config = teacher_flops_config(TeacherInfo(**{k: v for k, v in info.items() if k != "spec"}))
    assert encoder_forward_flops(config, student) < flops["teacher_flops_requested"]
    assert flops["teacher_flops_requested"] == pytest.approx(encoder_forward_flops(config, teacher), rel=0.01)
    assert flops["teacher_flops_vanilla_unpadded"] == pytest.approx(
        flops["teacher_flops_requested"], rel=0.01
    )
    assert flops["teacher_flops_spent"] > 0


def test_kd_across_vocabularies_trains_on_the_teachers_answers(workspace, server, tmp_path) -> None:
    """Logit KD and [CLS]-feature PKD (through the projection) get a loss from the text answers."""
    results = run_in_process(argv(workspace, tmp_path / "out", f"{server.url}#mpnet", "--max_steps", "6"))
    log = train_log(tmp_path / "out")
    assert len(log) == 6 and all(r["kd"] > 0 and r["pt"] > 0 for r in log)
    assert results["flops"]["selected_instances"] == 6 * BATCH
    assert results["flops"]["teacher_cache_hits"] >= ROWS  # at least the second epoch: the same texts


def test_a_teacher_with_the_students_vocabulary_still_gets_token_ids(
    workspace, server, tmp_path, monkeypatch
) -> None:
    queries = recorded(monkeypatch)
    results = run_in_process(argv(workspace, tmp_path / "out", f"{server.url}#bert"))
    assert len(queries) == 3 and all(isinstance(q, TeacherQuery) for q in queries)
    flops = results["flops"]
    assert (
        flops["teacher_tokens_large"]
        == flops["sent_student_tokens_large"]
        == sum(lengths(workspace, "student"))
    )


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    return lines[0]


def test_all_token_features_across_vocabularies_are_refused_before_training(workspace, tmp_path) -> None:
    out = tmp_path / "out"
    args = argv(workspace, out, f"local:{workspace['mpnet']}", "--pt_features", "all-tokens")
    line = one_line_error(run_cli(args))
    assert "--pt_features all-tokens needs teachers with the student's tokenizer" in line
    assert "teacher large has its own vocabulary" in line and "use --pt_features cls" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_teacher_budget_across_vocabularies_is_refused_before_training(workspace, tmp_path) -> None:
    """A text teacher counts its own tokens, known only once it answers: a budget could not hold."""
    out = tmp_path / "out"
    budget = ["--data_selection", "entropy", "--teacher_budget", "10%"]
    line = one_line_error(run_cli(argv(workspace, out, f"local:{workspace['mpnet']}", *budget)))
    assert "--teacher_budget in FLOPs needs teachers that share the student's vocabulary: large reads" in line
    assert "5000calls, 2Mtok" in line  # what works instead
    assert not (out / "metrics.jsonl").exists()


def test_an_unknown_model_type_is_refused_before_training(workspace, tmp_path) -> None:
    albert = tmp_path / "albert"
    save_tiny_family("bert", albert)
    config = albert / "config.json"
    config.write_text(config.read_text().replace('"model_type": "bert"', '"model_type": "albert"'))
    student = one_line_error(
        run_cli(
            distill_argv(albert, workspace["train"], tmp_path / "a", {"large": f"local:{workspace['mpnet']}"})
        )
    )
    assert "model_type 'albert' is not supported; supported families:" in student
    teacher = one_line_error(run_cli(argv(workspace, tmp_path / "b", f"local:{albert}")))
    assert "teacher large (local:" in teacher
    assert "model_type 'albert' is not supported" in teacher


def test_a_teacher_with_another_label_set_is_refused_before_training(workspace, tmp_path) -> None:
    three = save_tiny_mpnet(tmp_path / "three", num_labels=3)
    line = one_line_error(run_cli(argv(workspace, tmp_path / "out", f"local:{three}")))
    assert "teacher large predicts 3 labels but the data has 2" in line


def test_what_a_teacher_is_sent_follows_its_published_vocabulary(workspace) -> None:
    tokenizer = AutoTokenizer.from_pretrained(workspace["student"])
    mine = vocab_sha256(tokenizer)

    def info(**fields) -> TeacherInfo:
        return TeacherInfo("large", 2, 32, 2, ("0", "1"), tokenizer.vocab_size, 128, **fields)

    same, other = info(tokenizer_vocab_sha256=mine), info(tokenizer_vocab_sha256="0" * 64)
    chosen = text_teachers(
        {"small": same, "large": other}, tokenizer, tokenizer.vocab_size, all_token_features=False
    )
    assert chosen == {"large"}
    assert text_teachers({"large": info()}, tokenizer, tokenizer.vocab_size, all_token_features=True) == set()
    with pytest.raises(UserError, match="publishes no tokenizer fingerprint to be sent text instead"):
        text_teachers({"large": info()}, tokenizer, tokenizer.vocab_size + 1, all_token_features=False)
    with pytest.raises(UserError, match=r"teacher large is a 't5' model, which this trainer cannot count"):
        text_teachers(
            {"large": info(model_type="t5")}, tokenizer, tokenizer.vocab_size, all_token_features=False
        )
