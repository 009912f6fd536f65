"""Content-addressed LRU of teacher outputs, one entry per instance (row).

Epochs 2..N and augmented data ask the same questions again; rows are cached rather than
requests because the trainer reshuffles, so the same sentence arrives in different batches.
The key is a hash of everything the answer depends on: model name and revision, the row's
real tokens and token types, and the output spec. The cache lives on the event loop (no lock).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from teacher_server.engine import OutputSpec


@dataclass
class RowOutputs:
    """One instance's outputs, unpadded: logits [K], hidden_cls [n, H], hidden_states [n, len, H]."""

    logits: torch.Tensor | None
    hidden_cls: torch.Tensor | None
    hidden_states: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tensors = (self.logits, self.hidden_cls, self.hidden_states)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def row_key(
    model: str, revision: str | None, ids: torch.Tensor, types: torch.Tensor, spec: OutputSpec
) -> bytes:
    """Digest of (model, revision, real token ids, token types, output spec)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr((model, revision, spec.want_logits, spec.cls_layers, spec.token_layers)).encode())
    digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(b"|")
    digest.update(types.to(torch.int64).contiguous().numpy().tobytes())
    return digest.digest()


class OutputCache:
    """Least-recently-used rows within a byte budget (``max_bytes`` = 0 turns it off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._rows: OrderedDict[bytes, RowOutputs] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: bytes) -> RowOutputs | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: bytes, row: RowOutputs) -> None:
        """Store a private copy (a row sliced from a batch would pin the whole batch in memory)."""
        size = row.nbytes
        if size > self.max_bytes or key in self._rows:
            return
        self._rows[key] = RowOutputs(
            *(_own_storage(t) for t in (row.logits, row.hidden_cls, row.hidden_states))
        )
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            _, evicted = self._rows.popitem(last=False)
            self.bytes_used -= evicted.nbytes


def _own_storage(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, copied only when it is a view into a larger (batch) storage."""
    if tensor is None or tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()
