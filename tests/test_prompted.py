"""Prompted (zero-shot) teachers: a causal LM, a template and label words per class.

Class logits equal the log-sum-exp of the model's own next-token logits of each class's label
words (fp32 atol 1e-5, right or left padding, Gemma 2's final soft-capping included); only the
label words' rows of the LM head run, and the FLOPs model counts exactly those; the chat template
wraps the prompt; bad configurations fail in one line."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from shared.errors import UserError
from shared.flops import encoder_forward_flops
from shared.prompting import LabelPrompt
from shared.protocol import ModelMetadata
from shared.teacher_api import TeacherQuery, TextQuery
from student_trainer.teachers.local import LocalTeacherClient
from teacher_engine.engine import QueryError, TeacherEngine
from teacher_server.config import ServerConfig, teacher_entry
from tests.test_server_http import LiveServer, decode, infer
from tests.tiny_families import save_tiny_causal_lm

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad , i hate it", "fun !"]
TEMPLATE = "review , {text} . it was"
WORDS = {"negative": ["bad", "awful", "boring"], "positive": ["good", "great"]}
CHAT = (  # the user's turn between [CLS] and [SEP], then the assistant's turn opened with "it"
    "{% for m in messages %}[CLS] {{ m['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %} it{% endif %}"
)
CASES = ["llama", "gemma2", "gpt2"]  # untied, soft-capped, tied and absolute positions


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {case: save_tiny_causal_lm(case, root / case, chat_template=CHAT) for case in CASES}


def prompt_of(words=WORDS, chat: bool = False) -> LabelPrompt:
    return LabelPrompt.from_mapping({"prompt": TEMPLATE, "label_words": words, "chat": chat}, "test")


def engine_of(paths, case: str, chat: bool = False) -> TeacherEngine:
    return TeacherEngine.load(case, paths[case], prompt=prompt_of(chat=chat))


def expected_logits(engine: TeacherEngine, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """From the model's own forward: the next-token logits after each prompt's last real token."""
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=mask).logits
    last = mask.shape[1] - 1 if bool((mask[:, 0] == 0).any()) else mask.sum(dim=1) - 1  # left: the end
    after = logits[torch.arange(len(ids)), last]
    columns = [engine.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in WORDS["negative"]]
    negative = after[:, columns].logsumexp(dim=1)
    columns = [engine.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in WORDS["positive"]]
    return torch.stack([negative, after[:, columns].logsumexp(dim=1)], dim=1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", CASES)
def test_class_logits_are_the_label_words_next_token_logits(paths, case, side):
    engine = engine_of(paths, case)
    engine.tokenizer.padding_side = side
    ids, mask, _ = engine.tokenize(TEXTS)
    assert engine.info.label_names == ("negative", "positive") and engine.info.num_labels == 2
    answer = engine.run(TeacherQuery(ids, mask, None, want_logits=True, cls_layers=(3,)))
    if side == "right" or case != "gpt2":  # GPT-2's own forward shifts a left-padded row's positions
        torch.testing.assert_close(answer.logits, expected_logits(engine, ids, mask), atol=1e-5, rtol=0)
    engine.tokenizer.padding_side = "right"
    right = engine.run(TeacherQuery(*engine.tokenize(TEXTS), want_logits=True, cls_layers=(3,)))
    torch.testing.assert_close(answer.logits, right.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(answer.hidden_cls, right.hidden_cls, atol=1e-5, rtol=0)


def test_the_prompt_is_what_the_model_reads(paths):
    engine = engine_of(paths, "llama")
    ids, mask, _ = engine.tokenize(["a good movie"])
    assert engine.tokenizer.decode(ids[0][mask[0].bool()]) == "[CLS] review, a good movie. it was [SEP]"
    chat = engine_of(paths, "llama", chat=True)
    ids, mask, _ = chat.tokenize(["a good movie"])
    assert chat.tokenizer.decode(ids[0][mask[0].bool()]) == "[CLS] review, a good movie. it was [SEP] it"


@pytest.mark.parametrize("case", CASES)
def test_only_the_label_word_rows_of_the_lm_head_run_and_are_counted(paths, case):
    engine = engine_of(paths, case)
    engine.model.set_attn_implementation("eager")  # CPU SDPA hides attention from the counter
    ids, mask, _ = engine.tokenize(TEXTS)
    batch, length = ids.shape
    counter = FlopCounterMode(display=False)
    with counter:
        answer = engine.run(TeacherQuery(ids, mask, None, want_logits=True))
    rows, d = 5, engine.info.hidden_size  # five label words, each one row of the LM head
    assert counter.get_total_flops() == answer.teacher_flops
    body = encoder_forward_flops(engine.config, [length] * batch, with_head=False)
    assert answer.teacher_flops == body + batch * 2 * d * rows
    assert engine.info.flops_config["num_labels"] == rows and not engine.info.flops_config["pooler"]
    own = FlopCounterMode(display=False)
    with own, torch.inference_mode():
        engine.model(input_ids=ids, attention_mask=mask)
    assert own.get_total_flops() == body + batch * length * 2 * d * engine.config.vocab_size


def test_several_words_per_class_combine_by_log_sum_exp(paths):
    """A class's logit is the log of its words' probability mass: two words with equal logits
    give the class ln 2 more than one of them alone."""
    one = TeacherEngine.load("one", paths["llama"], prompt=prompt_of({"a": ["bad"], "b": ["good"]}))
    head = one.label_head
    assert head is not None and head.rows == 2
    pooled = torch.randn(4, one.info.hidden_size)
    head.weight.data[1] = head.weight.data[0]  # "good" now scores as "bad" does
    twice = prompt_of({"a": ["bad", "good"], "b": ["fun"]})
    both = TeacherEngine.load("both", paths["llama"], prompt=twice).label_head
    assert both is not None
    both.weight.data[1] = both.weight.data[0]
    torch.testing.assert_close(both(pooled)[:, 0], head(pooled)[:, 0] + torch.log(torch.tensor(2.0)))


def test_a_prompt_longer_than_max_seq_length_is_refused_whole(paths):
    engine = TeacherEngine.load("short", paths["llama"], max_seq_length=20, prompt=prompt_of())
    with pytest.raises(
        QueryError, match=r"rows \[1\]: the prompt has up to \d+ tokens, over max_seq_length 20"
    ):
        engine.tokenize(TEXTS)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": TEMPLATE}, "label_words must map at least two classes"),
        ({"label_words": WORDS}, "label_words and chat need a prompt"),
        ({"prompt": "no text here", "label_words": WORDS}, r"prompt must be a string holding '\{text\}'"),
        ({"prompt": "{text} {label}", "label_words": WORDS}, r"prompt may name only"),
        ({"prompt": TEMPLATE, "label_words": {"only": ["good"]}}, "at least two classes"),
        (
            {"prompt": TEMPLATE, "label_words": {"a": ["good"], "b": []}},
            "label_words.b must be a non-empty list",
        ),
        ({"chat": True}, "label_words and chat need a prompt"),
    ],
)
def test_bad_prompt_settings_fail_in_one_line(paths, fields, message):
    with pytest.raises(UserError, match=message):
        teacher_entry("teachers.0", name="t", path=str(paths["llama"]), **fields)


def test_label_words_of_two_classes_must_start_differently_and_a_model_without_lm_head_is_refused(paths):
    clash = prompt_of({"a": ["good"], "b": ["goods"]})  # "goods" is "good" + "##s"
    with pytest.raises(UserError, match="starts with the same token as a word of 'a'"):
        TeacherEngine.load("clash", paths["llama"], prompt=clash)
    lm = AutoModelForCausalLM.from_pretrained(paths["llama"])
    with pytest.raises(UserError, match="needs a causal LM"):
        TeacherEngine(
            "x",
            lm.model,  # the base model alone: no lm_head
            engine_of(paths, "llama").tokenizer,
            prompt=prompt_of(),
        )


def test_a_chat_template_must_exist(tmp_path):
    path = save_tiny_causal_lm("llama", tmp_path / "plain")
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        TeacherEngine.load("plain", path, prompt=prompt_of(chat=True))


def test_the_in_process_backend_takes_the_same_prompt(paths):
    client = LocalTeacherClient(paths["llama"], name="zs", prompt=TEMPLATE, label_words=WORDS)

    async def main():
        info = await client.start(60)
        try:
            return info, await client.infer(TextQuery(TEXTS))
        finally:
            await client.aclose()

    info, answer = asyncio.run(main())
    engine = engine_of(paths, "llama")
    assert info.label_names == ("negative", "positive")
    torch.testing.assert_close(
        answer.logits, expected_logits(engine, *engine.tokenize(TEXTS)[:2]), atol=1e-5, rtol=0
    )


def test_served_with_its_class_names_and_probabilities_at_a_temperature(paths):
    entry = {"name": "zs", "path": str(paths["gemma2"]), "prompt": TEMPLATE, "label_words": WORDS}
    with LiveServer(
        ServerConfig(teachers=[{**entry, "max_queue_delay_ms": 0, "dynamic_batching": False}])
    ) as live:
        meta = ModelMetadata.model_validate(httpx.get(f"{live.url}/v2/models/zs", trust_env=False).json())
        assert meta.teacher_info().label_names == ("negative", "positive")
        outputs = {"logits": None, "probs": None}
        got = decode(infer(live.url, "zs", {"text": TEXTS}, outputs=outputs, parameters={"temperature": 2.0}))
    engine = engine_of(paths, "gemma2")
    ids, mask, _ = engine.tokenize(TEXTS)
    logits = expected_logits(engine, ids, mask)
    torch.testing.assert_close(got.outputs["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.outputs["probs"], torch.softmax(logits / 2.0, dim=1), atol=1e-5, rtol=0)
