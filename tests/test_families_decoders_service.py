"""Decoder classifiers served over v2 REST and run in-process: the same answers as the model's
own forward, left-padded token ids taken as well as right-padded ones (token states back at the
caller's positions), and a published FLOPs shape that counts as the teacher's own config."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.flops import encoder_forward_flops
from shared.protocol import ModelMetadata
from shared.teacher_api import TextQuery
from student_trainer.teachers.local import LocalTeacherClient
from teacher_server.config import ServerConfig
from tests.test_server_http import LiveServer, decode, infer
from tests.tiny_families import save_tiny_family

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad", "fun !"]
TEACHERS = ("qwen3", "gpt2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    paths = {case: save_tiny_family(case, root / case) for case in TEACHERS}
    config = ServerConfig(
        teachers=[  # each request in one pass, as sent: its FLOPs are its own batch's
            {"name": case, "path": str(path), "max_queue_delay_ms": 0, "dynamic_batching": False}
            for case, path in paths.items()
        ]
    )
    with LiveServer(config) as live:
        live.paths = paths
        yield live


def own(server, case: str, side: str):
    """The teacher's own tokens of TEXTS padded on ``side``, and its own forward on them."""
    tokenizer = AutoTokenizer.from_pretrained(server.paths[case])
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    model = AutoModelForSequenceClassification.from_pretrained(server.paths[case]).eval()
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    return enc, out, model.config


@pytest.mark.parametrize("case", TEACHERS)
def test_metadata_publishes_a_flops_shape_that_counts_as_the_teacher(server, case):
    response = httpx.get(f"{server.url}/v2/models/{case}", trust_env=False)
    info = ModelMetadata.model_validate(response.json()).teacher_info()
    _, _, config = own(server, case, "right")
    assert info.model_type == config.model_type and info.num_layers == 3
    published = SimpleNamespace(**info.flops_config)
    assert encoder_forward_flops(published, [7, 30]) == encoder_forward_flops(config, [7, 30])


@pytest.mark.parametrize("case", TEACHERS)
def test_text_and_left_or_right_padded_ids_get_the_models_own_answer(server, case):
    outputs = {"logits": None, "hidden_cls": {"layers": "0,3"}, "hidden_states": {"layers": "2"}}
    enc, out, config = own(server, case, "right")
    right_real = enc["attention_mask"].bool()
    last = enc["attention_mask"].sum(dim=1) - 1
    rows = torch.arange(len(TEXTS))
    pooled = torch.stack([out.hidden_states[layer][rows, last] for layer in (0, 3)], dim=1)
    by_text = decode(infer(server.url, case, {"text": TEXTS}, outputs=outputs))
    torch.testing.assert_close(by_text.outputs["logits"], out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_text.outputs["hidden_cls"], pooled, atol=1e-5, rtol=0)
    for side in ("right", "left"):
        enc, _, _ = own(server, case, side)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        got = decode(infer(server.url, case, inputs, outputs=outputs, parameters={"cache": False}))
        torch.testing.assert_close(got.outputs["logits"], out.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.outputs["hidden_cls"], pooled, atol=1e-5, rtol=0)
        real, states = enc["attention_mask"].bool(), got.outputs["hidden_states"][:, 0]
        torch.testing.assert_close(states[real], out.hidden_states[2][right_real], atol=1e-5, rtol=0)
        assert not states[~real].any()
        batch, length = enc["input_ids"].shape
        assert got.header.parameters["padded_tokens"] == batch * length  # a decoder's pass is padded
        assert got.header.parameters["teacher_flops"] == encoder_forward_flops(config, [length] * batch)


def test_a_row_padded_on_both_sides_is_a_422_naming_the_mask(server):
    ids = torch.tensor([[0, 7, 8, 0], [5, 6, 7, 8]])
    response = infer(server.url, "qwen3", {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert response.status_code == 422 and response.json()["field"] == "attention_mask"


@pytest.mark.parametrize("case", TEACHERS)
def test_the_in_process_backend_answers_as_the_service(server, case):
    query = TextQuery(TEXTS, cls_layers=(1, 3))

    async def main():
        local = LocalTeacherClient(server.paths[case], name=case)
        await local.start(60)
        try:
            return await local.infer(query)
        finally:
            await local.aclose()

    got = asyncio.run(main())
    outputs = {"logits": None, "hidden_cls": {"layers": "1,3"}}
    want = decode(infer(server.url, case, {"text": TEXTS}, outputs=outputs, parameters={"cache": False}))
    torch.testing.assert_close(got.logits, want.outputs["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.hidden_cls, want.outputs["hidden_cls"], atol=1e-5, rtol=0)
    assert got.teacher_flops == want.header.parameters["teacher_flops"]
