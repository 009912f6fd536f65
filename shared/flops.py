"""Exact forward FLOPs of a BERT encoder, from its config and the real sequence lengths.

Convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses): one multiply-add
= 2 FLOPs, only matrix products counted (embedding look-ups, layer norms, softmax and
GELU are a fraction of a per cent and left out). For a sequence of ``n`` tokens, hidden
size ``d``, feed-forward size ``f``:

* each layer: ``2n·(4d² + 2d·f)`` (Q, K, V, output projections and the two FFN matrices)
  ``+ 4n²d`` (``QKᵀ`` and ``attention·V``);
* the head: ``2d²`` (pooler, on [CLS] only) ``+ 2dK`` (classifier).

Backward is counted as 2× forward (the usual convention: gradients w.r.t. activations and
weights each cost about one forward), so a training step is 3× forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

BACKWARD_TO_FORWARD = 2


class EncoderConfig(Protocol):
    """The fields of a ``transformers`` BERT config that the count depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_labels: int


def layer_forward_flops(hidden_size: int, intermediate_size: int, seq_len: int) -> int:
    """FLOPs of one encoder layer on one sequence of ``seq_len`` tokens."""
    d, f, n = hidden_size, intermediate_size, seq_len
    return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d


def head_forward_flops(hidden_size: int, num_labels: int) -> int:
    """FLOPs of the pooler and classifier on one sequence."""
    return 2 * hidden_size * hidden_size + 2 * hidden_size * num_labels


def encoder_forward_flops(
    config: EncoderConfig,
    seq_lens: Iterable[int],
    num_layers: int | None = None,
    *,
    with_head: bool | None = None,
) -> int:
    """Forward FLOPs for sequences of the given lengths through ``num_layers`` layers.

    ``num_layers`` defaults to the whole encoder; ``with_head`` (pooler + classifier)
    defaults to "the whole encoder ran", because logits need every layer.
    """
    total_layers = int(config.num_hidden_layers)
    layers = total_layers if num_layers is None else int(num_layers)
    if not 0 <= layers <= total_layers:
        raise ValueError(f"num_layers must be in 0..{total_layers}, got {num_layers}")
    head = layers == total_layers if with_head is None else with_head
    d, f, k = int(config.hidden_size), int(config.intermediate_size), int(config.num_labels)
    total = 0
    for n in seq_lens:
        if n < 0:
            raise ValueError(f"seq_lens must be non-negative, got {n}")
        total += layers * layer_forward_flops(d, f, int(n))
        if head:
            total += head_forward_flops(d, k)
    return total


def flops_per_token(config: EncoderConfig, seq_len: int = 128) -> float:
    """Encoder FLOPs per token at a typical length: a one-number summary for model metadata."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return encoder_forward_flops(config, [seq_len], with_head=False) / seq_len
