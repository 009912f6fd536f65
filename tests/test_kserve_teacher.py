"""A KServe v2 server that is not this service (KServe's own Python model server) as a teacher.

KServe lives in a virtual environment of its own (``pip install kserve``): point
``DKD_KSERVE_PYTHON`` at its python. ``tests/kserve_logits_model.py`` serves a model that answers
logits and nothing of this service's extra parameters (no FLOPs, no token counts, no labels).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.teacher_api import TeacherQuery
from student_trainer.teachers.client import make_teacher_client
from tests.distill_support import distill_argv, run_cli, run_in_process, save_student, write_sentences
from tests.server_process import free_port, server_process
from tests.test_distill_vocab import one_line_error

KSERVE_PYTHON = os.environ.get("DKD_KSERVE_PYTHON", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (KSERVE_PYTHON and os.access(KSERVE_PYTHON, os.X_OK)),
        reason="no KServe: set DKD_KSERVE_PYTHON to the python of a venv with `pip install kserve`",
    ),
]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("kserve") / "kserve.log"
    script = Path(__file__).with_name("kserve_logits_model.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [KSERVE_PYTHON, str(script), str(port), str(free_port())]
    with server_process(command, f"{url}/v2/models/foreign/ready", log_path, timeout_s=120):
        yield url


def test_a_foreign_v2_model_answers_as_a_logits_teacher_costed_by_tokens(kserve) -> None:
    teacher = make_teacher_client(f"{kserve}#foreign", name="foreign")
    ids, mask = torch.tensor([[5, 6, 0], [7, 8, 9]]), torch.tensor([[1, 1, 0], [1, 1, 1]])

    async def main():
        try:
            info = await teacher.start(30)
            return info, await teacher.infer(TeacherQuery(ids, mask))
        finally:
            await teacher.aclose()

    info, answer = asyncio.run(main())
    assert info.label_names == ("LABEL_0", "LABEL_1") and not info.text_only
    torch.testing.assert_close(answer.logits, torch.tensor([[11 / 7, -1.0], [24 / 7, -24 / 11]]))
    assert (answer.tokens, answer.padded_tokens, answer.teacher_flops) == (5, 5, 0)  # counted here


def test_a_run_distils_from_it_and_a_flops_budget_is_refused(kserve, tmp_path) -> None:
    student = save_student(tmp_path / "student")
    train_file = write_sentences(tmp_path / "train.tsv", 24, seed=5)
    teacher = {"foreign": f"{kserve}#foreign"}
    flops = run_in_process(distill_argv(student, train_file, tmp_path / "out", teacher))["flops"]
    assert flops["teacher_rows_foreign"] == 24 and flops["teacher_tokens_foreign"] > 24
    assert flops["teacher_flops_spent"] == 0
    budget = ["--data_selection", "entropy", "--teacher_budget", "1TF"]
    line = one_line_error(run_cli(distill_argv(student, train_file, tmp_path / "budget", teacher, *budget)))
    assert "--teacher_budget in FLOPs needs teachers whose FLOPs are known: foreign" in line
    calls = run_in_process(
        distill_argv(student, train_file, tmp_path / "calls", teacher, *budget[:3], "12calls")
    )
    assert 0 < calls["flops"]["teacher_rows_foreign"] <= 12
