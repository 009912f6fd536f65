"""A tiny random Llama causal LM with a byte-level BPE tokenizer, saved as an ordinary checkpoint:
what a real OpenAI-compatible server (vLLM) can load in tests, with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.tiny_models import WORDS

LABEL_WORDS = ("positive", "negative", "neutral")  # whole tokens of the vocabulary (with a leading space)


def save_tiny_causal_lm(path: Path, *, seed: int = 0) -> Path:
    """Save the tokenizer and a 2-layer Llama (grouped-query attention) to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join([*WORDS, *LABEL_WORDS])] * 20 + ["Review: Sentiment:"] * 20
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=256,
    )  # fmt: skip
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt as it is
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked next-token distribution, as a trained LM's is
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    return path
