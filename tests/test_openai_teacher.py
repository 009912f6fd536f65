"""The OpenAI-compatible teacher backend against a fake server: protocol edge cases, retries, costs."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
import torch
import yaml
from transformers import LlamaConfig

from shared.errors import UserError
from shared.flops import FlopsShape, encoder_forward_flops
from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TeacherQuery, TextQuery
from student_trainer.args.distill import parse_distill_args
from student_trainer.kd.ledger import scaled_lengths
from student_trainer.teachers.client import TeacherRequestError, make_teacher_client
from student_trainer.teachers.label_logprobs import FLOOR, class_logits
from student_trainer.teachers.openai import OpenAITeacherClient
from student_trainer.teachers.vllm_classify import VllmClassifyClient
from tests.distill_support import distill_argv, run_in_process, save_student, train_log, write_sentences
from tests.fake_openai import FakeOpenAI, classes, sentiment

PROMPT = {
    "prompt": "Review: {text}\nSentiment:",
    "label_words": {"negative": [" negative"], "positive": [" positive"]},
}


@pytest.fixture
def server():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


def client(server: FakeOpenAI, prompt: dict = PROMPT, **options) -> OpenAITeacherClient:
    spec = f"openai+{server.url}/v1#{server.model}"
    made = make_teacher_client(spec, name="llm", prompt=LabelPrompt.from_mapping(prompt, "test"), **options)
    assert isinstance(made, OpenAITeacherClient)
    return made


def ask(teacher: OpenAITeacherClient, *queries) -> list[TeacherAnswer]:
    async def main():
        try:
            await teacher.start(5.0)
            return [await teacher.infer(q) for q in queries]
        finally:
            await teacher.aclose()

    return asyncio.run(main())


TEXTS = ["a good film", "a bad film", "a film"]


def expected_logits(texts: list[str], words=((" negative",), (" positive",))) -> torch.Tensor:
    rows = [[math.log(sum(sentiment(t)[w] for w in ws)) for ws in words] for t in texts]
    return torch.tensor(rows)


# --- the maths ------------------------------------------------------------------------------------


def test_label_words_in_the_top_k_keep_their_log_probabilities_and_a_class_sums_its_words() -> None:
    top = {" positive": math.log(0.5), " great": math.log(0.2), " negative": math.log(0.1)}
    logits = class_logits(top, [(" negative",), (" positive", " great")], k=20)
    assert logits == pytest.approx([math.log(0.1), math.log(0.7)])


def test_words_outside_the_top_k_share_the_remaining_mass_capped_by_the_kth_most_likely() -> None:
    top = {" the": math.log(0.5), " positive": math.log(0.3)}  # 0.2 left for two missing words
    assert class_logits(top, [(" negative", " bad"), (" positive",)], k=2) == pytest.approx(
        [math.log(0.2), math.log(0.3)]
    )
    top = {" the": math.log(0.4), " positive": math.log(0.05)}  # 0.55 left, but none beats 0.05
    assert class_logits(top, [(" negative",), (" positive",)], k=2)[0] == pytest.approx(math.log(0.05))
    top = {
        " the": math.log(0.4),
        " a": math.log(0.3),
        " positive": math.log(1e-6),
    }  # positive: sampled, not top 2
    assert class_logits(top, [(" negative",), (" positive",)], k=2) == pytest.approx(
        [math.log(0.3), math.log(1e-6)], abs=1e-4
    )  # the 0.3 left goes to the missing word: capped by the 2nd most likely, not by the sampled one


def test_no_mass_left_gives_the_floor_not_minus_infinity() -> None:
    top = {" positive": 0.0}  # probability 1
    assert class_logits(top, [(" negative",), (" positive",)], k=20) == pytest.approx([math.log(FLOOR), 0.0])


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"prompt": "no field", "label_words": {"a": ["x"], "b": ["y"]}}, "{text}"),
        ({"prompt": "{text} {other}", "label_words": {"a": ["x"], "b": ["y"]}}, "may name only"),
        ({"prompt": "{text}", "label_words": {"a": ["x"]}}, "at least two classes"),
        ({"prompt": "{text}", "label_words": {"a": ["x"], "b": []}}, "label_words.b"),
        ({"prompt": "{text}", "label_words": {"a": ["x"], "b": ["x"]}}, "one class only"),
        ({"prompt": "{text}", "label_words": {"a": ["x"], "b": ["y"]}, "temp": 1}, "unknown field"),
    ],
)
def test_a_bad_prompt_config_is_refused_naming_the_field(raw: dict, complaint: str) -> None:
    with pytest.raises(UserError, match=complaint):
        LabelPrompt.from_mapping(raw, "prompt.yaml")


# --- the protocol ---------------------------------------------------------------------------------


def test_completions_send_every_row_in_one_request_and_count_the_servers_usage(server) -> None:
    (answer,) = ask(client(server), TextQuery(TEXTS))
    torch.testing.assert_close(answer.logits, expected_logits(TEXTS))
    assert answer.tokens == sum(len(f"Review: {t}\nSentiment:".split()) + 1 for t in TEXTS)
    assert [kind for kind, _ in server.requests] == ["completions"]
    body = server.requests[0][1]
    assert body["prompt"][1] == "Review: a bad film\nSentiment:" and body["max_tokens"] == 1
    assert body["temperature"] == 0.0 and body["logprobs"] == 20


def test_chat_sends_one_request_per_row_and_gives_the_same_logits(server) -> None:
    (answer,) = ask(client(server, {**PROMPT, "chat": True}), TextQuery(TEXTS))
    torch.testing.assert_close(answer.logits, expected_logits(TEXTS))
    assert [kind for kind, _ in server.requests] == ["chat"] * 3
    assert {body["messages"][0]["content"] for _, body in server.requests} == {
        f"Review: {t}\nSentiment:" for t in TEXTS
    }


def test_a_label_word_outside_the_top_k_shares_what_the_top_k_leave(server) -> None:
    prompt = {**PROMPT, "label_words": {"negative": [" negative"], "positive": [" positive", " great"]}}
    (answer,) = ask(client(server, prompt, top_logprobs=4), TextQuery(["a good film"]))
    dist = sentiment("a good film")  # top 4: positive .55, the .2, a .1, it .06 -> negative, great missing
    share = min((1 - (0.55 + 0.2 + 0.1 + 0.06)) / 2, 0.06)
    assert share == pytest.approx(0.045)
    want = [[math.log(share), math.log(dist[" positive"] + share)]]
    torch.testing.assert_close(answer.logits, torch.tensor(want))


def test_a_label_word_of_several_tokens_counts_by_its_first_token(server) -> None:
    server.tokenizer = {" negatively": [" negative", "ly"], " positively": [" positive", "ly"]}
    prompt = {**PROMPT, "label_words": {"negative": [" negatively"], "positive": [" positively"]}}
    (answer,) = ask(client(server, prompt), TextQuery(TEXTS))
    torch.testing.assert_close(answer.logits, expected_logits(TEXTS))


def test_where_the_server_tells_token_ids_the_most_likely_label_word_is_always_returned(server) -> None:
    server.tokenizer = {" it": [" it"], " great": [" great"]}
    prompt = {**PROMPT, "label_words": {"negative": [" it"], "positive": [" great"]}}
    (answer,) = ask(client(server, prompt, top_logprobs=2), TextQuery(["a good film"]))
    assert sorted(server.requests[-1][1]["allowed_token_ids"]) == [0, 1]  # the label words' ids
    # top 2: positive .55, the .2; " it" (.06) is sampled among the allowed, so it comes back too;
    # " great" shares what the three leave, capped by the 2nd most likely
    share = min(1 - (0.55 + 0.2 + 0.06), 0.2)
    torch.testing.assert_close(answer.logits, torch.tensor([[math.log(0.06), math.log(share)]]))


def test_classes_whose_words_begin_with_the_same_token_are_refused(server) -> None:
    server.tokenizer = {" positive": [" positive"], " positively": [" positive", "ly"]}
    prompt = {**PROMPT, "label_words": {"negative": [" positively"], "positive": [" positive"]}}
    with pytest.raises(TeacherRequestError, match="same token"):
        ask(client(server, prompt))


@pytest.mark.parametrize("plan", [["429:0.2"], ["503", "503"]])
def test_429_and_503_are_retried(server, plan: list[str]) -> None:
    server.plan = list(plan)
    (answer,) = ask(client(server, backoff_base_s=0.01), TextQuery(TEXTS))
    torch.testing.assert_close(answer.logits, expected_logits(TEXTS))
    assert len(server.requests) == len(plan) + 1


def test_where_the_checkpoint_is_readable_here_its_family_counts_the_flops(server, tmp_path) -> None:
    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    config.save_pretrained(tmp_path / "lm")
    server.root = str(tmp_path / "lm")
    teacher = client(server)
    (answer,) = ask(teacher, TextQuery(TEXTS))
    assert teacher.info is not None and teacher.info.flops_config is not None
    shape = FlopsShape(**teacher.info.flops_config)
    assert (shape.model_type, shape.num_hidden_layers, shape.num_labels, shape.pooler) == (
        "llama",
        2,
        500,
        False,
    )
    # the decoder over each prompt (an equal share of the server's tokens) and the LM head at its end
    assert (
        answer.teacher_flops == encoder_forward_flops(shape, scaled_lengths([1] * 3, answer.tokens / 3)) > 0
    )
    server.root = str(tmp_path / "nowhere")
    (answer,) = ask(client(server), TextQuery(TEXTS))
    assert answer.teacher_flops == 0 and answer.tokens > 0  # costed by tokens and calls only


def test_missing_usage_counts_no_tokens_and_says_so(server, caplog) -> None:
    server.usage = False
    with caplog.at_level(logging.WARNING):
        (answer,) = ask(client(server), TextQuery(TEXTS))
    assert answer.tokens == 0 and "reports no usage" in caplog.text
    torch.testing.assert_close(answer.logits, expected_logits(TEXTS))


def test_start_reports_the_labels_and_the_servers_context_length(server) -> None:
    teacher = client(server)
    info = asyncio.run(teacher.start(5.0))
    assert info.label_names == ("negative", "positive") and info.max_seq_length == 512 and info.text_only


def test_an_unknown_model_is_refused_at_start_naming_what_is_served(server) -> None:
    teacher = make_teacher_client(
        f"openai+{server.url}/v1#other", name="llm", prompt=LabelPrompt.from_mapping(PROMPT, "t")
    )
    with pytest.raises(TeacherRequestError, match="fake-lm"):
        ask(teacher)


def test_what_an_llm_teacher_cannot_answer_is_refused(server) -> None:
    ids = TeacherQuery(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TeacherRequestError, match="reads text"):
        ask(client(server), ids)
    with pytest.raises(TeacherRequestError, match="hidden states"):
        ask(client(server), TextQuery(TEXTS, cls_layers=(1,)))


def test_a_prompt_for_a_teacher_of_the_service_is_refused(tmp_path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROMPT))
    argv = distill_argv(tmp_path, tmp_path / "t.tsv", tmp_path / "out", {"big": "http://127.0.0.1:1#big"},
                        "--teacher_prompt", f"big={tmp_path / 'p.yaml'}")  # fmt: skip
    with pytest.raises(UserError, match="only an openai\\+ teacher"):
        assert parse_distill_args(argv).teacher_prompts is None  # not reached: refused


def test_a_spec_without_model_or_prompt_is_refused() -> None:
    with pytest.raises(UserError, match="names no model"):
        make_teacher_client("openai+http://127.0.0.1:1/v1", name="llm")
    with pytest.raises(UserError, match="--teacher_prompt"):
        make_teacher_client("openai+http://127.0.0.1:1/v1#m", name="llm")


# --- in a distillation run ------------------------------------------------------------------------


def test_a_run_distils_from_an_llm_behind_an_openai_server(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DKD_CACHE", str(tmp_path / "cache"))  # where --teacher_store auto keeps answers
    student = save_student(tmp_path / "student")
    train_file = write_sentences(tmp_path / "train.tsv", 24, seed=5)
    (tmp_path / "prompt.yaml").write_text(yaml.safe_dump(PROMPT))
    teacher = {"llm": f"openai+{server.url}/v1#{server.model}"}
    argv = distill_argv(student, train_file, tmp_path / "out", teacher, "--teacher_prompt",
                        f"llm={tmp_path / 'prompt.yaml'}")  # fmt: skip
    results = run_in_process(argv)
    prompts = [p for _, body in server.requests for p in body["prompt"]]
    assert results["global_step"] == 3 and len(prompts) == 24
    assert all(r["kd"] > 0 for r in train_log(tmp_path / "out"))
    flops = results["flops"]
    assert flops["teacher_tokens_llm"] == sum(len(p.split()) + 1 for p in prompts)  # the server's usage
    assert flops["teacher_rows_llm"] == 24
    assert flops["teacher_store_hit_rate"] == 0.0 and (tmp_path / "cache" / "teacher_answers.sqlite").exists()


# --- vLLM's /classify -----------------------------------------------------------------------------


def classifier(server: FakeOpenAI, **options) -> VllmClassifyClient:
    made = make_teacher_client(f"vllm+{server.url}#{server.model}", name="cls", **options)
    assert isinstance(made, VllmClassifyClient)
    return made


def test_a_vllm_classifier_answers_the_log_of_its_probabilities(server) -> None:
    server.plan = ["", "503"]  # the start-up probe is answered; the query's first try is not
    teacher = classifier(server, backoff_base_s=0.01)
    (answer,) = ask(teacher, TextQuery(TEXTS))
    assert teacher.info is not None and teacher.info.label_names == ("LABEL_0", "LABEL_1")
    torch.testing.assert_close(answer.logits, torch.tensor([classes(t) for t in TEXTS]).log())
    assert answer.tokens == sum(len(t.split()) for t in TEXTS) + 3  # the server's usage
    assert [kind for kind, _ in server.requests] == ["classify"] * 3  # probe, 503, the answer


def test_a_vllm_classifier_refuses_text_pairs(server) -> None:
    with pytest.raises(TeacherRequestError, match="single texts"):
        ask(classifier(server), TextQuery(TEXTS, text_pair=TEXTS))


@pytest.mark.parametrize(("budget", "unit"), [("10calls", "calls"), ("120tok", "tokens")])
def test_a_budget_in_calls_or_tokens_bounds_what_an_llm_teacher_is_asked(
    server, tmp_path, budget, unit
) -> None:
    student = save_student(tmp_path / "student")
    train_file = write_sentences(tmp_path / "train.tsv", 24, seed=5)
    (tmp_path / "prompt.yaml").write_text(yaml.safe_dump(PROMPT))
    options = ["--teacher_prompt", f"llm={tmp_path / 'prompt.yaml'}", "--teacher_store", "none",
               "--teacher_budget", budget, "--data_selection", "entropy"]  # fmt: skip
    teacher = {"llm": f"openai+{server.url}/v1#{server.model}"}
    flops = run_in_process(distill_argv(student, train_file, tmp_path / "out", teacher, *options))["flops"]
    prompts = [p for _, body in server.requests for p in body["prompt"]]
    spent = {"calls": len(prompts), "tokens": flops["teacher_tokens_llm"]}[unit]
    assert 0 < spent == flops[f"teacher_budget_spent_{unit}"] and flops["teacher_rows_llm"] == len(prompts)
    assert flops[f"teacher_budget_{unit}"] == int(budget.removesuffix(unit[:3]).removesuffix("calls"))
    if unit == "calls":  # known before asking: never over
        assert spent <= 10
