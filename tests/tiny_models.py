"""Tiny random BERT checkpoints (with a real WordPiece tokenizer) that tests build themselves.

No weights can be downloaded here, so every test that needs a teacher, a student or a
fill-mask model saves one of these to a temp dir and loads it through the real
``from_pretrained`` code paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an and or but not very really quite good great fine bad awful poor movie film story plot actor "
    "acting music scene love hate like boring fun funny dull sad happy best worst it is was this that "
    "i you we they he she of to in on for with as at by from one two three , . ! ? '"
).split()


def tiny_vocab() -> list[str]:
    """Specials, whole words, single letters and their ``##`` continuations: any ASCII text tokenizes."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    return list(dict.fromkeys(SPECIAL_TOKENS + WORDS + letters + [f"##{c}" for c in letters]))


def save_tiny_tokenizer(path: Path) -> BertTokenizerFast:
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tiny_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_config(
    *, num_layers: int = 2, hidden_size: int = 32, num_heads: int = 2, num_labels: int = 2, **extra
) -> BertConfig:
    return BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
        num_labels=num_labels,
        **extra,
    )


def save_tiny_bert(
    path: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 2,
    label_names: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a random ``BertForSequenceClassification`` + tokenizer to ``path`` and return it."""
    label_names = label_names or ["negative", "positive"]
    torch.manual_seed(seed)
    config = tiny_config(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    BertForSequenceClassification(config).eval().save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def save_tiny_mlm(path: Path, *, num_layers: int = 2, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a random ``BertForMaskedLM`` + tokenizer (augmentation tests need a fill-mask model)."""
    torch.manual_seed(seed)
    BertForMaskedLM(tiny_config(num_layers=num_layers, hidden_size=hidden_size)).eval().save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def layer_probe(engine, layer: torch.nn.Module) -> torch.nn.Module:
    """A module of ``layer`` that runs whenever the layer does: the layer itself on a padded pass,
    its last norm on a packed one (which calls the layer's parts, never the layer)."""
    return engine.family.parts(layer).output_norm if engine.packs else layer
