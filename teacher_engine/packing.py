"""A forward pass without padding: each layer's matrices run on the real tokens only.

A batch of sentences of mixed lengths, padded to the longest, spends most of a post-LN
encoder's FLOPs on the per-token matrices (Q, K, V, output, feed-forward) at padded
positions. Here the batch is packed to ``[tokens, hidden]`` for those, and only attention,
a small share of the work at sentence lengths, is padded back to ``[batch, heads, length,
length]`` to run per row (the "remove padding" of FasterTransformer and TEI, in plain torch).
Batches of 8 SST-2 sentences run MiniLM-L6 1.7-1.8x faster than padded, batches of 32 2.3x
(``benchmarks/bench_packing.py``, CPU).

Families whose layers are BERT-shaped (post-LN, absolute positions or an additive
relative-position bias) describe their layers as :class:`LayerParts`; the result equals the
model's own forward (fp32, atol 1e-5, ``tests/test_families.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

# torch's oneDNN linear (the kernel its compiler emits for CPU linears), where this build has it
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
if ONEDNN_LINEAR:

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape: list[int], w_shape: list[int], *_: object, **__: object) -> int:
        """What torch's FLOP counter counts for the call below: its matrix product, as for ``F.linear``."""
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


@dataclass(frozen=True)
class LayerParts:
    """One post-LN encoder layer: attention, add & norm, feed-forward, add & norm."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear
    attention_norm: nn.LayerNorm
    ffn_in: nn.Linear
    activation: Callable[[Tensor], Tensor]
    ffn_out: nn.Linear
    output_norm: nn.LayerNorm
    heads: int


@dataclass(frozen=True)
class Packing:
    """Where a right-padded batch's real tokens sit: ``index`` into the flattened
    ``[batch × length]`` positions, and ``starts``, each row's first token in the packed order."""

    index: Tensor
    starts: Tensor
    batch: int
    length: int

    @classmethod
    def of(cls, mask: Tensor) -> Packing:
        batch, length = mask.shape
        index = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(dim=1)
        starts = torch.cumsum(lengths, dim=0) - lengths
        return cls(index=index, starts=starts, batch=batch, length=length)

    def pack(self, padded: Tensor) -> Tensor:
        """``[batch, length, width]`` → ``[tokens, width]``."""
        return padded.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, packed: Tensor) -> Tensor:
        """``[tokens, width]`` → ``[batch, length, width]``, zeros at padding."""
        flat = packed.new_zeros(self.batch * self.length, packed.shape[-1])
        return flat.index_copy_(0, self.index, packed).view(self.batch, self.length, -1)

    def first_tokens(self, packed: Tensor) -> Tensor:
        """Each row's first token ([CLS]) as ``[batch, 1, width]``: what every packed head reads."""
        return packed.index_select(0, self.starts).unsqueeze(1)


def attention_bias(mask: Tensor, dtype: torch.dtype, position_bias: Tensor | None = None) -> Tensor:
    """The additive mask attention adds to its scores: padded keys at the dtype's minimum,
    plus the family's relative-position bias where it has one."""
    bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)
    bias.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
    return bias if position_bias is None else bias + position_bias


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, through oneDNN for float32 on the CPU: torch sends a float32 matrix product
    to MKL, which runs its AVX2 code on CPUs that are not Intel's, at half the FLOP/s oneDNN
    gets from the same AVX-512 cores (``benchmarks/bench_flops.py``); equal within rounding."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return layer(x)


def packed_layer(
    parts: LayerParts, hidden: Tensor, packing: Packing, bias: Tensor, *, first_tokens_only: bool = False
) -> Tensor:
    """One layer on packed ``[tokens, hidden]``; attention padded per row under ``bias``.

    ``first_tokens_only``: only each row's first token comes out, as ``[batch, hidden]``: all that
    a classification head or a [CLS] state reads of the last layer run. Keys and values still see
    every token; the query, output and feed-forward matrices, 5/6 of the layer, run on one token
    per row, and the answer is the same.
    """
    width = hidden.shape[-1]
    heads = parts.heads

    def per_row(projected: Tensor) -> Tensor:  # [batch, heads, length, head size]
        return projected.view(packing.batch, -1, heads, width // heads).transpose(1, 2)

    keys = per_row(packing.unpack(linear(parts.key, hidden)))
    values = per_row(packing.unpack(linear(parts.value, hidden)))
    if first_tokens_only:
        hidden = hidden.index_select(0, packing.starts)
        queries, bias = per_row(linear(parts.query, hidden)), bias[:, :, :1]
    else:
        queries = per_row(packing.unpack(linear(parts.query, hidden)))
    context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias)
    context = context.transpose(1, 2).reshape(packing.batch, -1, width)
    context = context.squeeze(1) if first_tokens_only else packing.pack(context)
    attended = parts.attention_norm(linear(parts.out, context) + hidden)
    inner = parts.activation(linear(parts.ffn_in, attended))
    return parts.output_norm(linear(parts.ffn_out, inner) + attended)
