"""Fingerprints of a tokenizer, so a trainer can tell whether a teacher reads its token ids.

A student may send token ids only to a teacher whose ids mean the same tokens: same vocabulary
(token → id) and the same special tokens. ``vocab_sha256`` hashes exactly that, so a cased and
an uncased BERT differ, while two copies of ``bert-base-uncased`` saved by different
``transformers`` versions agree. ``tokenizer_sha256`` hashes the whole serialized fast tokenizer
(normalizer, pre-tokenizer, post-processor too): equal means the same text gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import PreTrainedTokenizerBase


def vocab_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the id-ordered vocabulary and the special tokens' ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad", "mask", "unk")
    }
    payload = json.dumps({"vocab": vocab, "special_ids": specials}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 of the serialized fast tokenizer (``tokenizer.json``); None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def tokenizer_parameters(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer fields of a teacher's metadata ``parameters``."""
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_vocab_sha256": vocab_sha256(tokenizer),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }
