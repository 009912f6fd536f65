"""Exact forward FLOPs of a classifier (encoder or decoder), from its config and the real sequence lengths.

Convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses): one multiply-add
= 2 FLOPs, only matrix products and convolutions counted (embedding look-ups, layer norms,
softmax, GELU, rotary and bias additions are a fraction of a per cent and left out). For a
sequence of ``n`` tokens, hidden size ``d``, feed-forward size ``f``:

* each layer: ``2n·(4d² + m·d·f)`` (Q, K, V, output projections; ``m`` FFN matrices: 2, or
  3 for ModernBERT's gated GLU whose input matrix is ``d × 2f``) ``+ 4n²d`` (``QKᵀ`` and
  ``attention·V``, over every key: the eager and SDPA kernels compute ModernBERT's
  sliding-window layers in full and mask them, so they cost what global layers cost);
  a packed pass (``teacher_engine/packing.py``) runs attention at the pass's padded length ``a``
  (``4a²d``) and may run its last layer for the first token alone (keys and values of every
  token, ``4n·d²``, the rest on one token attending to ``a`` keys);
* the head: ``2d² + 2dK`` — the pooler (BERT), the dense layer of the classification head
  (RoBERTa, XLM-R, ELECTRA, MPNet, ModernBERT), ``pre_classifier`` (DistilBERT, no pooler) or
  the context pooler (DeBERTa) are all ``d × d`` on [CLS] (or the mean), then ``d × K``.

Decoder (LLM) classifiers (Llama, Mistral, Qwen2/3, Gemma 1/2/3, GPT-2) differ in three terms:

* grouped-query attention: the query and output projections are ``d × q`` (``q`` = heads ×
  ``head_dim``, which Gemma sets apart from ``d``), keys and values ``d × k`` each (``k`` =
  key-value heads × ``head_dim``): ``2n·(2dq + 2dk + m·d·f)``, attention ``4n²q``;
* gated MLPs (all but GPT-2): gate, up and down, ``m = 3``; GPT-2's is ``d × 4d`` and back, ``m = 2``;
* the head is ``score`` alone, ``2dK`` on the pooled (last real) token: no pooler. Whether the
  embeddings are tied to an LM head changes parameters, never these FLOPs (a look-up is free, and a
  classifier has no LM head). Causal and sliding-window masks are counted over every key, as the
  eager and SDPA kernels compute them.

Family extras, counted where the model really computes them:

* ELECTRA / DeBERTa with ``embedding_size != hidden_size``: ``2n·e·d`` for the projection of
  the embeddings (whenever the encoder runs);
* DeBERTa's disentangled attention (``relative_attention``): per layer and per attention kind
  in ``pos_att_type`` (c2p, p2c), ``2n·2S·d`` for the scores against the ``2S`` relative
  position embeddings (``S`` = ``position_buckets`` or ``max_relative_positions``), plus the
  projection of those ``2S`` embeddings, ``2·2S·d²`` each
  (two with ``share_att_key``, else one per kind) — once per forward **call**, whatever the
  batch, so a caller that ran a batch says so with ``batches``; ``conv_kernel_size`` adds the
  first layer's convolution, ``2n·d·(d/groups)·k``;
* MPNet's relative position bias is a table look-up added to the scores: nothing to count.

Backward is counted as 2× forward (the usual convention: gradients w.r.t. activations and
weights each cost about one forward), so a training step is 3× forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

BACKWARD_TO_FORWARD = 2
# Model types whose feed-forward block is gated (three d × f matrices), and those whose head is
# ``score`` on the last real token (no d × d pooler): facts about their compute, kept here.
GATED_FFN = frozenset({"modernbert", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
SCORE_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2"})


class EncoderConfig(Protocol):
    """The fields of a ``transformers`` config that every count depends on (BERT's names; the
    family extras are read with defaults, so a namespace with these four is a BERT)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_labels: int


@dataclass(frozen=True)
class FlopsShape:
    """What the count reads from a config, under one set of names for every family.

    ``asdict`` of it is what a teacher publishes as ``flops_config``: a
    ``SimpleNamespace(**flops_config)`` counts the same as the teacher's own config.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_labels: int
    ffn_matrices: int = 2
    embedding_size: int = 0  # != hidden_size: the embeddings are projected (ELECTRA, DeBERTa)
    relative_kinds: int = 0  # DeBERTa: attention kinds (c2p, p2c) against relative positions
    relative_span: int = 0  # DeBERTa: rows of relative position embeddings (2S)
    relative_projections: int = 0  # DeBERTa: projections of those rows per layer and call
    conv_kernel: int = 0  # DeBERTa: the first layer's convolution
    conv_groups: int = 1
    query_width: int = 0  # heads × head_dim, when it is not hidden_size (Gemma)
    kv_width: int = 0  # key-value heads × head_dim, when it is not hidden_size (grouped-query attention)
    pooler: bool = True  # a d × d dense before the classifier (encoders); decoders score directly

    @classmethod
    def of(cls, config: Any) -> FlopsShape:
        """Read a ``transformers`` config (any supported family) or a published ``flops_config``
        (a namespace with BERT's four fields only counts as a BERT)."""
        if isinstance(config, FlopsShape):
            return config
        if hasattr(config, "ffn_matrices"):  # a published flops_config (older ones lack the newer fields)
            known = [name for name in cls.__dataclass_fields__ if hasattr(config, name)]
            return cls(**{name: getattr(config, name) for name in known})
        model_type = str(getattr(config, "model_type", "") or "bert")
        hidden = int(config.hidden_size)
        shape = cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=_ffn_width(config, model_type),
            num_hidden_layers=int(config.num_hidden_layers),
            num_labels=int(config.num_labels),
            ffn_matrices=3 if model_type in GATED_FFN else 2,
            pooler=model_type not in SCORE_HEAD,
        )
        if model_type in SCORE_HEAD and model_type != "gpt2":
            heads = int(config.num_attention_heads)
            head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            shape = replace(shape, query_width=heads * head_dim, kv_width=kv_heads * head_dim)
        if model_type in ("electra", "deberta-v2"):
            shape = replace(shape, embedding_size=int(getattr(config, "embedding_size", None) or hidden))
        if model_type == "deberta-v2":
            shape = replace(shape, **_deberta_fields(config))
        return shape


def _ffn_width(config: Any, model_type: str) -> int:
    """The feed-forward width: DistilBERT names it ``hidden_dim``, GPT-2 ``n_inner`` (None: 4d)."""
    if model_type == "gpt2":
        return int(config.n_inner or 4 * config.hidden_size)
    return int(getattr(config, "intermediate_size", None) or config.hidden_dim)


def _deberta_fields(config: Any) -> dict[str, Any]:
    """DeBERTa-v2's disentangled attention and convolution, as its modules build them."""
    fields: dict[str, Any] = {}
    if getattr(config, "relative_attention", False):
        kinds = [kind for kind in ("c2p", "p2c") if kind in (config.pos_att_type or ())]
        span = int(getattr(config, "max_relative_positions", -1))
        span = int(config.max_position_embeddings) if span < 1 else span
        buckets = int(getattr(config, "position_buckets", -1))
        fields.update(
            relative_kinds=len(kinds),
            relative_span=2 * (buckets if buckets > 0 else span),
            relative_projections=2 if getattr(config, "share_att_key", False) else len(kinds),
        )
    if int(getattr(config, "conv_kernel_size", 0) or 0) > 0:
        fields.update(
            conv_kernel=int(config.conv_kernel_size), conv_groups=int(getattr(config, "conv_groups", 1))
        )
    return fields


def next_token_shape(config: Any) -> FlopsShape:
    """A causal LM asked for its next token by an OpenAI-compatible server: the head is its LM
    head over the whole vocabulary, at the last token (no pooler)."""
    return replace(FlopsShape.of(config), num_labels=int(config.vocab_size), pooler=False)


def flops_config(config: Any) -> dict[str, Any]:
    """The fields a teacher publishes so that a remote trainer counts as the teacher does."""
    return asdict(FlopsShape.of(config))


def layer_forward_flops(
    hidden_size: int,
    intermediate_size: int,
    seq_len: int,
    ffn_matrices: int = 2,
    attention_len: int | None = None,
    query_width: int = 0,
    kv_width: int = 0,
) -> int:
    """FLOPs of one layer on one sequence of ``seq_len`` tokens whose attention ran at
    ``attention_len`` (default ``seq_len``; a packed pass pads only attention); the query and
    key-value widths default to ``hidden_size`` (no grouped-query attention)."""
    d, f, n = hidden_size, intermediate_size, seq_len
    q, k = query_width or d, kv_width or d
    a = n if attention_len is None else attention_len
    return 2 * n * (2 * d * q + 2 * d * k + ffn_matrices * d * f) + 4 * a * a * q


def head_forward_flops(hidden_size: int, num_labels: int, pooler: bool = True) -> int:
    """FLOPs of the pooler (or dense layer of the head), if any, and classifier on one sequence."""
    return 2 * hidden_size * hidden_size * pooler + 2 * hidden_size * num_labels


def first_token_layer_flops(
    hidden_size: int,
    intermediate_size: int,
    seq_len: int,
    ffn_matrices: int,
    attention_len: int,
    query_width: int = 0,
    kv_width: int = 0,
) -> int:
    """A layer that outputs only the first token (a packed pass's last layer when only [CLS] is
    read): keys and values of every token, the rest of the layer on one token attending to all."""
    d, f, n = hidden_size, intermediate_size, seq_len
    q, k = query_width or d, kv_width or d
    return 2 * n * 2 * d * k + 2 * (2 * d * q + ffn_matrices * d * f) + 4 * attention_len * q


def _sequence_flops(
    shape: FlopsShape, n: int, layers: int, attention_len: int | None, first_token_last: bool = False
) -> int:
    """Every per-token and per-pair term of one sequence through ``layers`` layers."""
    d, f, m = shape.hidden_size, shape.intermediate_size, shape.ffn_matrices
    widths = {"query_width": shape.query_width, "kv_width": shape.kv_width}
    last_alone = first_token_last and layers > 0
    total = (layers - last_alone) * layer_forward_flops(d, f, n, m, attention_len, **widths)
    if last_alone:
        a = n if attention_len is None else attention_len
        total += first_token_layer_flops(d, f, n, m, a, **widths)
    if shape.embedding_size and shape.embedding_size != d:
        total += 2 * n * shape.embedding_size * d
    total += layers * shape.relative_kinds * 2 * n * shape.relative_span * d
    if shape.conv_kernel and layers:
        total += 2 * n * d * (d // shape.conv_groups) * shape.conv_kernel
    return total


def encoder_forward_flops(
    config: EncoderConfig | Any,
    seq_lens: Iterable[int],
    num_layers: int | None = None,
    *,
    with_head: bool | None = None,
    batches: int | None = None,
    attention_len: int | None = None,
    first_token_last: bool = False,
) -> int:
    """Forward FLOPs for sequences of the given lengths through ``num_layers`` layers.

    ``num_layers`` defaults to the whole encoder; ``with_head`` (pooler + classifier)
    defaults to "the whole encoder ran", because logits need every layer. ``batches`` is how
    many forward calls ran the sequences (default: each sequence on its own); only DeBERTa's
    per-call projection of relative position embeddings depends on it. ``attention_len``: the
    length every sequence's attention ran at, when a packed pass padded only attention;
    ``first_token_last``: the last layer run output only the first token
    (:func:`first_token_layer_flops`).
    """
    shape = FlopsShape.of(config)
    total_layers = shape.num_hidden_layers
    layers = total_layers if num_layers is None else int(num_layers)
    if not 0 <= layers <= total_layers:
        raise ValueError(f"num_layers must be in 0..{total_layers}, got {num_layers}")
    head = layers == total_layers if with_head is None else with_head
    total = count = 0
    for n in seq_lens:
        if n < 0:
            raise ValueError(f"seq_lens must be non-negative, got {n}")
        count += 1
        total += _sequence_flops(shape, int(n), layers, attention_len, first_token_last)
        if head:
            total += head_forward_flops(shape.hidden_size, shape.num_labels, shape.pooler)
    calls = count if batches is None else min(int(batches), count)
    d = shape.hidden_size
    total += calls * layers * shape.relative_projections * 2 * shape.relative_span * d * d
    return total


def flops_per_token(config: EncoderConfig | Any, seq_len: int = 128) -> float:
    """Encoder FLOPs per token at a typical length: a one-number summary for model metadata."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return encoder_forward_flops(config, [seq_len], with_head=False) / seq_len
