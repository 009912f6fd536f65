"""Tiny random classifiers of every supported family, built with ``AutoConfig.for_model``.

Each is small (hidden 32, 3 layers) but keeps what makes its family different: ELECTRA's
narrower embeddings, DeBERTa's disentangled attention with buckets, shared or separate
position keys and its convolution, ModernBERT's alternating global and sliding-window layers
(a window shorter than the test sentences) with [CLS] or mean pooling.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    MPNetTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from tests.tiny_models import save_tiny_tokenizer, tiny_vocab

COMMON = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}

# case name -> (model_type, config overrides)
FAMILY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("bert", {}),
    "roberta": ("roberta", {"type_vocab_size": 1, "pad_token_id": 0}),
    "xlm-roberta": ("xlm-roberta", {"type_vocab_size": 1, "pad_token_id": 0}),
    "electra": ("electra", {"embedding_size": 16}),
    "mpnet": ("mpnet", {}),
    "distilbert": ("distilbert", {"dim": 32, "n_layers": 3, "n_heads": 2, "hidden_dim": 64}),
    "deberta-v3": (
        "deberta-v2",
        {
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 8,
            "max_relative_positions": 64,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "position_biased_input": False,
            "type_vocab_size": 0,
        },
    ),
    "deberta-v2-conv": (
        "deberta-v2",
        {
            "relative_attention": True,
            "pos_att_type": ["c2p"],
            "max_relative_positions": 16,
            "conv_kernel_size": 3,
            "embedding_size": 24,
            "type_vocab_size": 2,
        },
    ),
    "modernbert": (
        "modernbert",
        {"global_attn_every_n_layers": 2, "local_attention": 8, "classifier_pooling": "cls"},
    ),
    "modernbert-mean": (
        "modernbert",
        {"global_attn_every_n_layers": 2, "local_attention": 8, "classifier_pooling": "mean"},
    ),
}

# Decoder classifiers: grouped-query attention (4 query heads, 2 key-value heads) and, where the
# family has them, a head_dim apart from hidden/heads, sliding windows shorter than the test
# sentences, untied embeddings; pad id 0 = the tiny tokenizer's [PAD], so the model's own forward
# finds the last real token as the engine does.
DECODER = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
WINDOWED = ["sliding_attention", "full_attention", "sliding_attention"]
DECODER_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {**DECODER, "tie_word_embeddings": False}),
    "mistral": ("mistral", {**DECODER, "sliding_window": 4}),
    "qwen2": ("qwen2", {**DECODER}),
    "qwen3": ("qwen3", {**DECODER, "head_dim": 16}),
    "gemma": ("gemma", {**DECODER, "head_dim": 16}),
    "gemma2": (
        "gemma2",
        {**DECODER, "head_dim": 8, "sliding_window": 4, "layer_types": WINDOWED},
    ),
    "gemma3": (
        "gemma3_text",
        {**DECODER, "head_dim": 16, "sliding_window": 4, "layer_types": WINDOWED},
    ),
    "gpt2": ("gpt2", {"n_inner": 64, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}),
}
ALL_CASES = {**FAMILY_CASES, **DECODER_CASES}

SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3}


def tiny_family_config(case: str, num_labels: int = 3) -> PretrainedConfig:
    model_type, overrides = ALL_CASES[case]
    fields: dict[str, Any] = {**COMMON, "vocab_size": len(tiny_vocab()), "max_position_embeddings": 128}
    if model_type == "distilbert":
        fields = {"vocab_size": fields["vocab_size"], "max_position_embeddings": 128}
    if model_type == "modernbert":
        fields.update(SPECIAL_IDS)
    return AutoConfig.for_model(model_type, **{**fields, **overrides}, num_labels=num_labels)


def tiny_family_model(case: str, seed: int = 0, num_labels: int = 3) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_family_config(case, num_labels)).eval()


def save_tiny_family(case: str, path: Path, seed: int = 0) -> Path:
    """Save a random classifier of ``case`` with the tiny WordPiece tokenizer to ``path``."""
    tiny_family_model(case, seed).save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def save_tiny_causal_lm(case: str, path: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """A random causal LM of a decoder ``case`` (its LM head, no classifier) with the tiny
    WordPiece tokenizer, and a chat template when given one."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_family_config(case)).eval().save_pretrained(path)
    tokenizer = save_tiny_tokenizer(path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(path)
    return path


def save_tiny_mpnet(path: Path, *, num_labels: int = 3, seed: int = 0, without: Collection[str] = ()) -> Path:
    """A random tiny MPNet with an MPNet tokenizer of its own: <s>/</s> specials, pad id 1, the
    tiny WordPiece words at other ids (so its vocabulary fingerprint is not a BERT student's);
    the words ``without`` names are left out, so it spells them letter by letter."""
    tiny_family_model("mpnet", seed, num_labels).save_pretrained(path)
    specials = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]  # MPNet's own: its unknown token is [UNK]
    words = [token for token in tiny_vocab() if not token.startswith("[") and token not in without]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + words))}
    MPNetTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128).save_pretrained(path)
    return path
