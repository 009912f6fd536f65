"""What a teacher is asked and what it answers, independent of the transport.

Both sides use these: the service's engine answers a :class:`TeacherQuery` with a
:class:`TeacherAnswer`; the trainer's clients (HTTP or in-process) return the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass(frozen=True)
class TeacherInfo:
    """What the trainer needs to know about a teacher before it asks anything."""

    name: str
    num_layers: int
    hidden_size: int
    num_labels: int
    label_names: tuple[str, ...]
    vocab_size: int
    max_seq_length: int
    intermediate_size: int | None = None  # FFN width: the trainer's FLOPs model of vanilla KD needs it
    # Family and tokenizer (decide whether the student's token ids mean the same tokens, else send
    # text) and the FLOPs model's fields (``SimpleNamespace(**flops_config)`` counts as the teacher)
    model_type: str | None = None
    tokenizer_class: str | None = None
    tokenizer_vocab_sha256: str | None = None
    tokenizer_sha256: str | None = None
    flops_config: dict[str, Any] | None = None
    text_only: bool = False  # reads raw text only (a teacher behind another server, its vocabulary unknown)

    def metadata_parameters(self) -> dict[str, Any]:
        """These fields as the service publishes them in the model metadata ``parameters``."""
        names = (
            "model_type",
            "tokenizer_class",
            "tokenizer_vocab_sha256",
            "tokenizer_sha256",
            "flops_config",
        )
        return {name: getattr(self, name) for name in names}


@dataclass
class TeacherQuery:
    """One batch of already-tokenized instances and the outputs the loss needs.

    ``cls_layers`` are hidden-state indices (0 = embeddings, ``num_layers`` = last layer);
    ``token_layers`` likewise but all token positions (``all-tokens`` patient loss).
    """

    input_ids: torch.Tensor  # LongTensor [B, L]
    attention_mask: torch.Tensor  # LongTensor [B, L]
    token_type_ids: torch.Tensor | None = None  # LongTensor [B, L]
    want_logits: bool = True
    cls_layers: tuple[int, ...] = ()
    token_layers: tuple[int, ...] = ()
    use_cache: bool = True


@dataclass
class TextQuery:
    """The same request as raw text, for a teacher whose vocabulary is not the student's: the
    teacher tokenizes it with its own tokenizer (``text_pair`` for pair tasks)."""

    text: list[str]
    text_pair: list[str] | None = None
    want_logits: bool = True
    cls_layers: tuple[int, ...] = ()
    token_layers: tuple[int, ...] = ()
    use_cache: bool = True

    def tokenized(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> TeacherQuery:
        """This request once the teacher has tokenized the text."""
        wanted = {f.name: getattr(self, f.name) for f in fields(TeacherQuery) if hasattr(self, f.name)}
        return TeacherQuery(input_ids, attention_mask, token_type_ids, **wanted)


def query_rows(query: TeacherQuery | TextQuery) -> int:
    """How many instances a query asks about."""
    return len(query.text) if isinstance(query, TextQuery) else int(query.input_ids.shape[0])


@dataclass(frozen=True)
class Timings:
    """Where the service spent a request's time, per stage, in microseconds (TEI's per-stage metadata)."""

    queue_us: float = 0.0  # waiting in the batcher's queue
    compute_us: float = 0.0  # the forward passes that computed its rows


@dataclass
class TeacherAnswer:
    """Teacher outputs as float32 CPU tensors, plus the service's own cost accounting."""

    logits: torch.Tensor | None  # [B, K]
    hidden_cls: torch.Tensor | None  # [B, len(cls_layers), H]
    hidden_states: torch.Tensor | None  # [B, len(token_layers), L, H]
    teacher_flops: int
    tokens: int
    padded_tokens: int
    cache_hits: int = 0
    timings: Timings = field(default_factory=Timings)
    store_hits: int = 0  # rows answered from the trainer's on-disk store of teacher answers
    store_lookups: int = 0  # rows looked up there
    store_tokens: int = 0  # the store's rows' tokens, as their teacher counted them when it answered
