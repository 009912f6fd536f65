"""A teacher with its own tokenizer (a tiny MPNet) served over v2 REST: text in, its own tokens
counted, and metadata that lets a trainer tell its vocabulary from a BERT student's."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
import torch
from transformers import AutoTokenizer, MPNetForSequenceClassification

from shared.flops import encoder_forward_flops
from shared.protocol import ModelMetadata
from shared.vocabulary import tokenizer_sha256, vocab_sha256
from teacher_server.config import ServerConfig
from tests.test_server_http import LiveServer, decode, infer
from tests.tiny_families import save_tiny_mpnet

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad", "fun !"]
PAIRS = ["i like it", "not great", "the best film of the year"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_teachers):
    mpnet = save_tiny_mpnet(tmp_path_factory.mktemp("mpnet") / "mpnet")
    config = ServerConfig(
        teachers=[
            {"name": "mpnet", "path": str(mpnet), "max_queue_delay_ms": 0},
            {"name": "bert", "path": str(tiny_teachers["small"]), "max_queue_delay_ms": 0},
        ]
    )
    with LiveServer(config) as live:
        live.mpnet_path = mpnet
        yield live


def metadata(server, name: str) -> ModelMetadata:
    response = httpx.get(f"{server.url}/v2/models/{name}", trust_env=False)
    assert response.status_code == 200, response.text
    return ModelMetadata.model_validate(response.json())


def test_metadata_tells_the_vocabularies_apart(server, tiny_teachers):
    mpnet, bert = metadata(server, "mpnet").teacher_info(), metadata(server, "bert").teacher_info()
    own = AutoTokenizer.from_pretrained(server.mpnet_path)
    assert (mpnet.model_type, bert.model_type) == ("mpnet", "bert")
    assert mpnet.tokenizer_vocab_sha256 == vocab_sha256(own)
    assert mpnet.tokenizer_sha256 == tokenizer_sha256(own)
    student = AutoTokenizer.from_pretrained(tiny_teachers["large"])  # a BERT student's tokenizer
    assert bert.tokenizer_vocab_sha256 == vocab_sha256(student) != mpnet.tokenizer_vocab_sha256
    assert mpnet.max_seq_length == 128 - 2  # MPNet numbers positions from 2
    config = MPNetForSequenceClassification.from_pretrained(server.mpnet_path).config
    published = SimpleNamespace(**mpnet.flops_config)
    assert encoder_forward_flops(published, [7, 30]) == encoder_forward_flops(config, [7, 30])


def test_text_is_tokenized_with_the_teachers_own_tokenizer(server):
    model = MPNetForSequenceClassification.from_pretrained(server.mpnet_path).eval()
    enc = AutoTokenizer.from_pretrained(server.mpnet_path)(TEXTS, PAIRS, padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == 0 and enc["attention_mask"].sum() < enc["input_ids"].numel()
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    outputs = {"logits": None, "hidden_cls": {"layers": "0,2"}}
    got = decode(infer(server.url, "mpnet", {"text": TEXTS, "text_pair": PAIRS}, outputs=outputs))
    torch.testing.assert_close(got.outputs["logits"], out.logits, atol=1e-5, rtol=0)
    expected = torch.stack([out.hidden_states[layer][:, 0] for layer in (0, 2)], dim=1)
    torch.testing.assert_close(got.outputs["hidden_cls"], expected, atol=1e-5, rtol=0)
    batch, length = enc["input_ids"].shape
    assert got.header.parameters["tokens"] == int(enc["attention_mask"].sum())  # the teacher's own tokens
    lengths = enc["attention_mask"].sum(dim=1).tolist()  # MPNet packs: its matrices ran on these
    assert got.header.parameters["padded_tokens"] == sum(lengths) < batch * length
    assert got.header.parameters["teacher_flops"] == encoder_forward_flops(
        model.config, lengths, batches=1, attention_len=length, first_token_last=True
    )


def test_token_types_a_model_does_not_take_must_be_zero(server):
    ids = torch.tensor([[0, 6, 15, 2]], dtype=torch.int32)
    ok = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}
    assert decode(infer(server.url, "mpnet", ok)).outputs["logits"].shape == (1, 3)
    response = infer(server.url, "mpnet", {"input_ids": ids, "token_type_ids": torch.ones_like(ids)})
    assert response.status_code == 422 and response.json()["field"] == "token_type_ids"
