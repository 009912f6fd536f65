"""Texts to a padded batch of token ids with a teacher's own tokenizer, set up once.

Called as ``tokenizer(texts, pairs, padding=True, truncation=True, ...)``, a transformers fast
tokenizer sets its Rust backend's truncation and padding again on every call and turns each
encoding into Python dicts of lists before building tensors, on the service's event loop for every
request. Here a copy of the backend is set up once (cut to ``max_length``, padded to the batch's
longest, the wrapper's sides, pad token and special-token handling) and its encodings go straight
into tensors. The ids, mask and token types equal the wrapper's call (``tests/test_tokenizing.py``);
a tokenizer without a Rust backend, or without a pad token, is called as before (the latter fails
alike when asked to pad).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class BatchTokenizer:
    """``tokenizer``'s ids, attention mask and (with ``token_types``) token type ids for a batch of
    texts, or of text pairs, cut to ``max_length`` tokens and padded to the longest row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, token_types: bool):
        self.tokenizer, self.max_length, self.token_types = tokenizer, max_length, token_types
        self.sides = self._sides()
        self.backend = self._backend()

    def _sides(self) -> tuple[str, str]:
        """The sides the wrapper pads and cuts on: whoever holds the tokenizer may change them
        (left padding for a decoder's rows), and the backend follows."""
        return self.tokenizer.padding_side, self.tokenizer.truncation_side

    def _backend(self) -> Tokenizer | None:
        """A copy of the tokenizer's Rust backend set to cut and pad as the wrapper's call would
        (the wrapper sets its own backend anew on each call); ``None`` where there is none."""
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
            return None
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.enable_truncation(
            self.max_length, strategy="longest_first", direction=tokenizer.truncation_side
        )
        backend.enable_padding(
            direction=tokenizer.padding_side,
            pad_id=tokenizer.pad_token_id,
            pad_type_id=tokenizer.pad_token_type_id,
            pad_token=str(tokenizer.pad_token),
        )
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return backend

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Batch:
        if self._sides() != self.sides:
            self.sides, self.backend = self._sides(), self._backend()
        if self.backend is None:
            return self._wrapped(texts, pairs)
        encodings = self.backend.encode_batch(
            list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        )
        ids = torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long)
        mask = torch.tensor([encoding.attention_mask for encoding in encodings], dtype=torch.long)
        if not self.token_types:
            return ids, mask, None
        return ids, mask, torch.tensor([encoding.type_ids for encoding in encodings], dtype=torch.long)

    def _wrapped(self, texts: Sequence[str], pairs: Sequence[str] | None) -> Batch:
        enc = self.tokenizer(
            list(texts),
            None if pairs is None else list(pairs),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=self.token_types,
        )
        return enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")
