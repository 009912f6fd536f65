"""Content-addressed LRU of teacher outputs, one entry per instance (row).

Epochs 2..N and augmented data ask the same questions again; rows are cached rather than
requests because the trainer reshuffles, so the same sentence arrives in different batches.
The key is a hash of everything the answer depends on: model name and revision, the row's
real tokens and token types, and the output spec. The cache lives on the event loop (no lock).
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch

from teacher_engine.engine import OutputSpec


@dataclass
class RowOutputs:
    """One instance's outputs, unpadded: logits [K], hidden_cls [n, H], hidden_states [n, len, H]."""

    logits: torch.Tensor | None
    hidden_cls: torch.Tensor | None
    hidden_states: torch.Tensor | None


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


# What one entry costs in resident memory beyond its key and buffer objects, CPython 3.11 on glibc:
# its OrderedDict slot, index and node (~160 bytes by tracemalloc), and about as much again that the
# allocator keeps once rows come and go (the dict's table is rebuilt as they do, and glibc keeps the
# freed tables' space). Set so that RSS grows by about the budget in a long run that turns the cache
# over many times: benchmarks/bench_cache_rss.py, 0.85-1.00 x the budget at 4, 16 and 64 MiB
# (with 160 counted here, 1.9 x).
ENTRY_OVERHEAD_BYTES = 450
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ALIGN = 8  # tensors viewing the buffer start at a multiple of 8 bytes


class OutputCache:
    """Least-recently-used rows within a byte budget (``max_bytes`` = 0 turns it off).

    A row is kept compactly: one contiguous buffer per entry, a small header (dtypes and shapes)
    then the tensors' bytes. The budget counts the resident memory an entry costs (key, buffer,
    dict slot, the allocator's share: ``ENTRY_OVERHEAD_BYTES``), not only the tensor bytes: a
    3-logit row counts 592 bytes for its 12 tensor bytes.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._rows: OrderedDict[bytes, bytearray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: bytes) -> RowOutputs | None:
        buffer = self._rows.get(key)
        if buffer is None:
            return None
        self._rows.move_to_end(key)
        return unpack_row(buffer)

    def put(self, key: bytes, row: RowOutputs) -> None:
        """Store a packed copy (a row sliced from a batch would pin the whole batch in memory)."""
        if key in self._rows:
            return
        buffer = pack_row(row)
        size = entry_bytes(key, buffer)
        if size > self.max_bytes:
            return
        self._rows[key] = buffer
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            self.bytes_used -= entry_bytes(*self._rows.popitem(last=False))


def entry_bytes(key: bytes, buffer: bytearray) -> int:
    """The memory one entry holds: its objects by ``sys.getsizeof``, plus the dict's share."""
    return sys.getsizeof(key) + sys.getsizeof(buffer) + ENTRY_OVERHEAD_BYTES


def pack_row(row: RowOutputs) -> bytearray:
    """One buffer: per output a dtype code (0 = absent) and its shape, then the tensors' bytes."""
    tensors = [t.detach().cpu().contiguous() if t is not None else None for t in row_tensors(row)]
    header = b"".join(
        struct.pack(f"<BB{t.dim()}i", 1 + _DTYPES.index(t.dtype), t.dim(), *t.shape)
        if t is not None
        else b"\0\0"
        for t in tensors
    )
    offset = -(-len(header) // _ALIGN) * _ALIGN
    buffer = bytearray(offset + sum(-(-t.nbytes // _ALIGN) * _ALIGN for t in tensors if t is not None))
    buffer[: len(header)] = header
    for t in tensors:
        if t is not None and t.nbytes:
            out = torch.frombuffer(buffer, dtype=torch.uint8, count=t.nbytes, offset=offset)
            out.copy_(t.view(-1).view(torch.uint8))
        offset += -(-t.nbytes // _ALIGN) * _ALIGN if t is not None else 0
    return buffer


def unpack_row(buffer: bytearray) -> RowOutputs:
    """Tensors viewing ``buffer`` (read-only use: the batcher stacks them into new tensors)."""
    specs, at = [], 0
    for _ in range(3):
        code, ndim = buffer[at], buffer[at + 1]
        shape = struct.unpack_from(f"<{ndim}i", buffer, at + 2) if code else ()
        specs.append((_DTYPES[code - 1], shape) if code else None)
        at += 2 + 4 * ndim
    offset = -(-at // _ALIGN) * _ALIGN
    tensors: list[torch.Tensor | None] = []
    for spec in specs:
        if spec is None:
            tensors.append(None)
            continue
        dtype, shape = spec
        count = math.prod(shape)
        flat = (
            torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors.append(flat.view(shape))
        offset += -(-count * dtype.itemsize // _ALIGN) * _ALIGN
    return RowOutputs(*tensors)


def row_tensors(row: RowOutputs) -> tuple[torch.Tensor | None, ...]:
    return (row.logits, row.hidden_cls, row.hidden_states)
