"""A forward pass without padding: each layer's matrices run on the real tokens only.

A batch of sentences of mixed lengths, padded to the longest, spends most of a post-LN
encoder's FLOPs on the per-token matrices (Q, K, V, output, feed-forward) at padded
positions. Here the batch is packed to ``[tokens, hidden]`` for those, and only attention,
a small share of the work at sentence lengths, is padded back to ``[rows, heads, length,
length]``, for each group of rows of like length (the "remove padding" of FasterTransformer and
TEI, in plain torch).
Batches of 8 SST-2 sentences run MiniLM-L6 1.7-1.8x faster than padded, batches of 32 2.3x
(``benchmarks/bench_packing.py``, CPU).

Families whose layers are BERT-shaped (post-LN, absolute positions or an additive
relative-position bias) describe their layers as :class:`LayerParts`; the result equals the
model's own forward (fp32, atol 1e-5, ``tests/test_families.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

# torch's oneDNN linear (the kernel its compiler emits for CPU linears), where this build has it
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
if ONEDNN_LINEAR:

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape: list[int], *shapes: object, **_: object) -> int:
        """What torch's FLOP counter counts for the calls below: their matrix product, as for
        ``F.linear``. The ``binary`` overload (a sum fused in, no FLOPs counted) takes the
        summand second and the weight third; the plain one the weight second, a bias third."""
        second, third = shapes[0], shapes[1]
        weight = third if isinstance(third, tuple | list) and len(third) == 2 else second
        assert isinstance(weight, tuple | list)
        return 2 * math.prod(x_shape[:-1]) * weight[0] * weight[1]


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
class Group:
    """Rows of like length that attention runs together, padded to the longest of them: ``rows``
    (in the batch), ``tokens`` (their slice of the packed order), ``index``, where those tokens sit
    in the group's flattened ``[rows × length]``, ``gather``, the token each position of it reads,
    and ``bias``, their slice of the pass's attention bias, cut once for every layer."""

    rows: Tensor
    tokens: slice
    index: Tensor
    gather: Tensor
    length: int
    bias: Tensor

    def unpack(self, packed: Tensor) -> Tensor:
        """The group's ``[tokens, width]`` → ``[rows, length, width]``. A padded position holds its
        row's first token, not zeros: the bias gives those keys no weight and their queries'
        context is dropped, so a gather does (a scatter into zeros and the zero fill were 18 % of
        a pass of 64 rows at 2 threads)."""
        return packed.index_select(0, self.gather).view(len(self.rows), self.length, -1)


@dataclass(frozen=True)
class Packing:
    """Where a right-padded batch's real tokens sit: ``index`` into the flattened
    ``[batch × length]`` positions, and ``starts``, each row's first token in the packed order.

    Rows are packed longest first (``order``) and cut into :class:`Group` s of like length, so
    that attention pads each row only to its group's longest: a pass of 64 SST-2 sentences pads
    rows of 14 tokens on average to about 50, and attention over the whole batch at once cost a
    third of the pass (``docs/benchmarks.md``)."""

    index: Tensor
    starts: Tensor
    batch: int
    length: int
    order: Tensor
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, mask: Tensor, bias: Tensor) -> Packing:
        """The packing of ``mask``'s batch, its groups under the pass's attention ``bias``
        (``[batch, 1 or heads, 1 or length, length]``)."""
        batch, length = mask.shape
        lengths = mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        rows, columns = mask.index_select(0, order).nonzero(as_tuple=True)
        index = order[rows] * length + columns
        ends = torch.cumsum(lengths[order], dim=0)
        starts = torch.empty_like(ends).index_copy_(0, order, ends - lengths[order])
        cut = groups(rows, columns, bias, order, lengths[order].tolist())
        return cls(index, starts, batch, length, order, cut)

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


def groups(
    rows: Tensor, columns: Tensor, bias: Tensor, order: Tensor, lengths: list[int]
) -> tuple[Group, ...]:
    """Rows (``order``, longest first, of ``lengths``; each real token's row in that order and its
    column, ``rows`` and ``columns``) cut where a row's attention, padded to its group's longest,
    would cost over twice its own (a cut costs a few kernel calls a layer), each group with its
    rows' slice of ``bias``."""
    found, first, token = [], 0, 0
    for row in range(len(lengths) + 1):
        if row == len(lengths) or 2 * lengths[row] ** 2 < lengths[first] ** 2:
            longest, count = lengths[first], sum(lengths[first:row])
            tokens = slice(token, token + count)
            index = (rows[tokens] - first) * longest + columns[tokens]  # right-aligned: columns < longest
            sizes = torch.tensor(lengths[first:row], device=rows.device)
            gather = (torch.cumsum(sizes, dim=0) - sizes).repeat_interleave(longest)  # rows' first tokens
            gather[index] = torch.arange(count, device=rows.device)
            members = order[first:row]
            cut = bias.index_select(0, members)[..., :longest, :longest]
            found.append(Group(members, tokens, index, gather, longest, cut))
            first, token = row, token + count
    return tuple(found)


SMALL_SCORES = 2**18  # attention scores, [rows, heads, queries, keys], that fit a core's L2 here (1 MiB)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q kᵀ / √d + bias) v``. In float32 on the CPU, where a group's scores are small,
    as two matrix products and a softmax: torch's flash kernel tiles for long rows, and on SST-2's
    groups this is 1.4-2.5x faster alone at 2 threads, 1.0-1.6x at 1; a pass of 64 rows 1.03-1.15x
    at 2 threads (``benchmarks/bench_flops.py``). Larger scores go to the flash kernel, which never
    holds them whole."""
    small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_SCORES
    if not (small and q.device.type == "cpu" and q.dtype == torch.float32):  # bf16: SDPA sums in fp32
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(scores.softmax(-1), v)


def attention_bias(mask: Tensor, dtype: torch.dtype, position_bias: Tensor | None = None) -> Tensor:
    """The additive mask attention adds to its scores: padded keys at the dtype's minimum,
    plus the family's relative-position bias where it has one."""
    bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)
    bias.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
    return bias if position_bias is None else bias + position_bias


def on_onednn(tensor: Tensor) -> bool:
    """Whether products with ``tensor`` run through oneDNN: float32 on the CPU, where torch has it."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and ONEDNN_LINEAR


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, through oneDNN for float32 on the CPU: torch sends a float32 matrix product
    to MKL, which runs its AVX2 code on CPUs that are not Intel's, at half the FLOP/s oneDNN
    gets from the same AVX-512 cores (``benchmarks/bench_flops.py``); equal within rounding."""
    if on_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return layer(x)


def fused_activation(activation: Callable[[Tensor], Tensor]) -> str | None:
    """oneDNN's name for ``activation`` where it can fuse it into a product: the exact (erf) GELU,
    as ``F.gelu``, ``nn.GELU`` or transformers' ``GELUActivation`` (which wraps ``F.gelu``)."""
    exact = isinstance(activation, nn.GELU) and activation.approximate == "none"
    return "gelu" if exact or F.gelu in (activation, getattr(activation, "act", None)) else None


def side_by_side(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors`` concatenated along their first dimension, detached; one alone is not copied."""
    return (tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))).detach()


@dataclass(frozen=True)
class Product:
    """``x @ weight.T + bias`` for one or more ``nn.Linear`` side by side (Q, K and V as one
    product), then an activation, the weight prepared once for the kernel that runs it.

    In float32 on the CPU that kernel is oneDNN's (:func:`linear`), the weight reordered once to its
    blocked layout, the activation and a residual sum fused into the product: the teacher's
    layers take a second copy of their weights, and a packed pass of MiniLM-L6 runs 1.03-1.26x
    faster than product by product (``benchmarks/bench_flops.py``), with the same answer."""

    weight: Tensor
    bias: Tensor | None
    sizes: tuple[int, ...]
    onednn: bool
    fused: str | None = None
    activation: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def of(cls, *layers: nn.Linear, activation: Callable[[Tensor], Tensor] | None = None) -> Product:
        weight = side_by_side([layer.weight for layer in layers])
        bias = None
        if any(layer.bias is not None for layer in layers):  # a layer without one adds zeros
            biases = [
                layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias
                for layer in layers
            ]
            bias = side_by_side(biases)
        onednn = on_onednn(weight)
        if onednn:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        fused = fused_activation(activation) if onednn and activation is not None else None
        sizes = tuple(layer.out_features for layer in layers)
        return cls(weight, bias, sizes, onednn, fused, None if fused else activation)

    def __call__(self, x: Tensor) -> Tensor:
        if self.onednn:
            post_op, algorithm = (self.fused, "none") if self.fused else ("none", "")
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post_op, [], algorithm)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self.activation is None else self.activation(y)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """``self(x) + residual`` for a product without activation, the sum fused into it on oneDNN."""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return F.linear(x, self.weight, self.bias) + residual


@dataclass(frozen=True)
class LayerProducts:
    """A layer as the packed pass runs it: its parts and its products, prepared once per teacher."""

    parts: LayerParts
    qkv: Product
    out: Product
    ffn_in: Product
    ffn_out: Product

    @classmethod
    def of(cls, parts: LayerParts) -> LayerProducts:
        qkv = Product.of(parts.query, parts.key, parts.value)
        ffn_in = Product.of(parts.ffn_in, activation=parts.activation)
        return cls(parts, qkv, Product.of(parts.out), ffn_in, Product.of(parts.ffn_out))


def packed_layer(
    layer: LayerProducts, hidden: Tensor, packing: Packing, *, first_tokens_only: bool = False
) -> Tensor:
    """One layer on packed ``[tokens, hidden]``; attention padded per group of rows under each
    group's bias.

    ``first_tokens_only``: only each row's first token comes out, as ``[batch, hidden]``: all that
    a classification head or a [CLS] state reads of the last layer run. Keys and values still see
    every token; the query, output and feed-forward matrices, 5/6 of the layer, run on one token
    per row, and the answer is the same.
    """
    parts = layer.parts
    if first_tokens_only:  # Q on the first tokens alone: not the fused product
        keys, values = linear(parts.key, hidden), linear(parts.value, hidden)
        hidden = hidden.index_select(0, packing.starts)
        queries = linear(parts.query, hidden)
    else:
        queries, keys, values = layer.qkv(hidden).split(layer.qkv.sizes, dim=-1)
    context = torch.cat(
        [attend(queries, keys, values, group, parts.heads, first_tokens_only) for group in packing.groups]
    )
    if first_tokens_only:  # the rows, longest first, back in the batch's order
        context = torch.empty_like(context).index_copy_(0, packing.order, context)
    attended = parts.attention_norm(layer.out.plus(context, hidden))
    return parts.output_norm(layer.ffn_out.plus(layer.ffn_in(attended), attended))


def attend(
    queries: Tensor, keys: Tensor, values: Tensor, group: Group, heads: int, first: bool = False
) -> Tensor:
    """One group's attention, its context packed: ``keys`` and ``values`` packed ``[tokens, hidden]``;
    ``queries`` packed too, or with ``first`` one a row of the batch, for the rows' first tokens."""
    rows = len(group.rows)

    def per_row(packed: Tensor) -> Tensor:  # [rows, heads, length, head size]
        return packed.view(rows, -1, heads, packed.shape[-1] // heads).transpose(1, 2)

    bias = group.bias[..., :1, :] if first else group.bias
    k, v = per_row(group.unpack(keys[group.tokens])), per_row(group.unpack(values[group.tokens]))
    q = per_row(queries.index_select(0, group.rows) if first else group.unpack(queries[group.tokens]))
    context = attention(q, k, v, bias)
    context = context.transpose(1, 2).reshape(rows * q.shape[2], -1)
    return context if first else context.index_select(0, group.index)
