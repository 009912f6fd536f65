"""The teacher's batch tokenizer gives exactly what its transformers tokenizer's call gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from teacher_engine.tokenizing import BatchTokenizer
from tests.tiny_causal_lm import save_tiny_causal_lm
from tests.tiny_families import save_tiny_mpnet
from tests.tiny_models import save_tiny_tokenizer

TEXTS = [
    "a good movie",
    "",
    "the plot , the acting and the music were really quite awful but i like it " * 6,
    "this [SEP] is not a sentence break , and 42 is unknown <pad> </s>",
]
PAIRS = ["is it good ?", "the worst film " * 40, "", "happy ! " * 3]


def wrapper_call(tokenizer, texts, pairs, max_length: int, token_types: bool):
    enc = tokenizer(
        texts, pairs, padding=True, truncation=True, max_length=max_length,
        return_tensors="pt", return_token_type_ids=token_types,
    )  # fmt: skip
    return enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")


def assert_same(got, expected):
    for mine, theirs in zip(got, expected, strict=True):
        if theirs is None:
            assert mine is None
            continue
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert torch.equal(mine, theirs)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    save_tiny_tokenizer(root / "wordpiece")
    save_tiny_causal_lm(root / "bpe")
    save_tiny_mpnet(root / "mpnet")
    return {name: AutoTokenizer.from_pretrained(root / name) for name in ("wordpiece", "bpe", "mpnet")}


@pytest.mark.parametrize("name", ["wordpiece", "bpe", "mpnet"])
@pytest.mark.parametrize("pairs", [None, PAIRS], ids=["texts", "pairs"])
@pytest.mark.parametrize("max_length", [8, 64])
def test_equals_the_tokenizers_own_call(tokenizers, name, pairs, max_length):
    """Cut (both texts of a pair, longest first) and padded alike, special tokens written in the
    text treated alike, token types given or not."""
    tokenizer = tokenizers[name]
    for token_types in (True, False):
        batch = BatchTokenizer(tokenizer, max_length, token_types)
        got = batch(TEXTS, pairs)
        assert_same(got, wrapper_call(tokenizer, TEXTS, pairs, max_length, token_types))
        assert got[0].shape[1] == max_length  # the long rows were cut, the others padded


def test_follows_the_padding_and_cutting_sides_set_after_it(tokenizers):
    """Sides set on the tokenizer after the batch tokenizer was built (left padding for a decoder's
    rows) are followed."""
    tokenizer = tokenizers["bpe"]
    batch = BatchTokenizer(tokenizer, 16, token_types=False)
    try:
        tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
        got = batch(TEXTS)
        assert_same(got, wrapper_call(tokenizer, TEXTS, None, 16, False))
        assert got[1][0, -1] == 1 and got[1][0, 0] == 0  # a short row, padded on the left
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    assert_same(batch(TEXTS), wrapper_call(tokenizer, TEXTS, None, 16, False))


def test_a_tokenizer_without_a_pad_token_is_called_as_it_is(tmp_path):
    """Nothing to pad with: its own call decides, and refuses as it would."""
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_causal_lm(tmp_path / "bpe"))
    tokenizer.pad_token = None
    batch = BatchTokenizer(tokenizer, 16, token_types=False)
    assert batch.backend is None
    with pytest.raises(ValueError, match="padding token"):
        wrapper_call(tokenizer, TEXTS, None, 16, False)
    with pytest.raises(ValueError, match="padding token"):
        batch(TEXTS)
