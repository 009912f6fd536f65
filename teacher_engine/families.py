"""Where each model family keeps its parts, so a teacher can run any of them layer by layer.

The engine's early exit runs the embeddings, then only the first ``k`` layers a request needs,
then the classification head only when logits are asked for. Each Hugging Face family keeps
those parts under different names and feeds its layers different extras (attention masks,
relative position biases, rotary embeddings), so each gets one small adapter here that says
where they live. The engine's tests prove, for every family, that the adapter's pieces put
together equal the model's own forward (``*ForSequenceClassification``, fp32, atol 1e-5).

Decoder (LLM) classifiers are families too: causal attention, rotary positions (absolute ones
for GPT-2), a final norm, and a ``score`` head on the last real token of each row instead of a
head on [CLS]. The engine hands every family right-aligned rows (real tokens first), so "the last
real token" is at ``length - 1`` and rotary positions start at 0 in every row.

Hidden state ``j`` is what the model's own ``output_hidden_states`` returns at index ``j``:
0 = the embeddings as the first layer sees them, ``j`` = the output of layer ``j``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_bidirectional_sliding_window_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from shared.errors import UserError
from teacher_engine.packing import LayerParts, attention_bias

Context = dict[str, Any]  # what every layer of one forward pass needs besides the hidden states
# A ``*ForSequenceClassification`` model: its parts are found by attribute name, so typed loosely.
Model = Any
Layer = Any  # one encoder layer of such a model, read the same way


class Family:
    """BERT's layout; the other families override what differs.

    ``base`` is the attribute of the ``*ForSequenceClassification`` model that holds the encoder;
    ``position_offset`` is how many position ids the embeddings reserve (RoBERTa-style models
    number positions from ``pad_token_id + 1``), so the longest input is shorter by that much.
    ``packs``: its layers are post-LN and BERT-shaped, so a padded batch may run packed
    (:mod:`teacher_engine.packing`) from the :meth:`parts` of each layer.
    """

    model_types: ClassVar[tuple[str, ...]] = ("bert",)
    base: ClassVar[str] = "bert"
    token_types: ClassVar[bool] = True
    packs: ClassVar[bool] = True
    causal: ClassVar[bool] = False  # reads the last real token, so rows may come left-padded

    def position_offset(self, config: Any) -> int:
        return 0

    def encoder(self, model: Model) -> Any:
        return getattr(model, self.base)

    def layers(self, model: Model) -> nn.ModuleList:
        return self.encoder(model).encoder.layer

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        return self.encoder(model).embeddings(input_ids=ids, token_type_ids=types)

    def project(self, model: Model, embedded: Tensor) -> Tensor:
        """The embeddings as the first layer takes them (ELECTRA projects narrow ones), apart
        from :meth:`embed` so that a packed pass projects only the real tokens."""
        return embedded

    def context(self, model: Model, hidden: Tensor, mask: Tensor) -> Context:
        return {
            "mask": create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
        }

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        return layer(hidden, ctx["mask"])

    def last(self, model: Model, hidden: Tensor) -> Tensor:
        """The last layer's output as the model publishes it (and its head reads it)."""
        return hidden

    def parts(self, layer: Layer) -> LayerParts:
        attention, intermediate = layer.attention, layer.intermediate
        return LayerParts(
            attention.self.query,
            attention.self.key,
            attention.self.value,
            attention.output.dense,
            attention.output.LayerNorm,
            intermediate.dense,
            intermediate.intermediate_act_fn,
            layer.output.dense,
            layer.output.LayerNorm,
            attention.self.num_attention_heads,
        )

    def pooled(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The token whose state stands for the row (``[batch, hidden]``): [CLS], the first."""
        return hidden[:, 0]

    def packed_bias(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        """What a packed pass's attention adds to its scores (``hidden``: the padded embeddings)."""
        return attention_bias(mask, hidden.dtype)

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        """Logits from the last hidden state (pooler + classifier)."""
        return model.classifier(model.dropout(self.encoder(model).pooler(hidden)))

    def type_vocab_size(self, config: Any) -> int:
        """How many token types the embeddings take (0: the family takes none)."""
        return int(getattr(config, "type_vocab_size", 0) or 0) if self.token_types else 0

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings) - self.position_offset(config)


class RobertaFamily(Family):
    """RoBERTa and XLM-R: BERT's layers; positions from ``pad_token_id + 1``; a dense+tanh head on <s>."""

    model_types = ("roberta", "xlm-roberta")
    base = "roberta"

    def position_offset(self, config: Any) -> int:
        return int(config.pad_token_id) + 1

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        return model.classifier(hidden)


class ElectraFamily(Family):
    """ELECTRA: BERT's layers; embeddings narrower than the layers go through ``embeddings_project``."""

    model_types = ("electra",)
    base = "electra"

    def project(self, model: Model, embedded: Tensor) -> Tensor:
        project = getattr(self.encoder(model), "embeddings_project", None)
        return embedded if project is None else project(embedded)

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        return model.classifier(hidden)


class MPNetFamily(Family):
    """MPNet: no token types; one relative-position bias computed once and shared by every layer."""

    model_types = ("mpnet",)
    base = "mpnet"
    token_types = False

    def position_offset(self, config: Any) -> int:
        return 2  # MPNetEmbeddings numbers positions from padding_idx + 1 = 2, whatever the config says

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        return self.encoder(model).embeddings(input_ids=ids)

    def context(self, model: Model, hidden: Tensor, mask: Tensor) -> Context:
        bias = self.encoder(model).encoder.compute_position_bias(hidden)
        return {**super().context(model, hidden, mask), "position_bias": bias}

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        return layer(hidden, ctx["mask"], ctx["position_bias"])[0]

    def parts(self, layer: Layer) -> LayerParts:
        attention = layer.attention
        attn = attention.attn
        return LayerParts(
            attn.q,
            attn.k,
            attn.v,
            attn.o,
            attention.LayerNorm,
            layer.intermediate.dense,
            layer.intermediate.intermediate_act_fn,
            layer.output.dense,
            layer.output.LayerNorm,
            attn.num_attention_heads,
        )

    def packed_bias(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        position_bias = self.encoder(model).encoder.compute_position_bias(hidden)
        return attention_bias(mask, hidden.dtype, position_bias)

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        return model.classifier(hidden)


class DistilBertFamily(Family):
    """DistilBERT: no token types, no pooler; ``pre_classifier`` + ReLU on [CLS] instead."""

    model_types = ("distilbert",)
    base = "distilbert"
    token_types = False

    def layers(self, model: Model) -> nn.ModuleList:
        return self.encoder(model).transformer.layer

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        return self.encoder(model).embeddings(ids)

    def parts(self, layer: Layer) -> LayerParts:
        attention, ffn = layer.attention, layer.ffn
        return LayerParts(
            attention.q_lin,
            attention.k_lin,
            attention.v_lin,
            attention.out_lin,
            layer.sa_layer_norm,
            ffn.lin1,
            ffn.activation,
            ffn.lin2,
            layer.output_layer_norm,
            attention.n_heads,
        )

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        pooled = torch.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))


class DebertaV2Family(Family):
    """DeBERTa-v2/v3: disentangled attention fed the relative positions and their embeddings; the
    padding mask also zeroes the embeddings; an optional convolution after the first layer."""

    model_types = ("deberta-v2",)
    base = "deberta"
    packs = False  # disentangled attention: its scores are not q·k plus a bias

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        if types is None:
            types = torch.zeros_like(ids)
        return self.encoder(model).embeddings(input_ids=ids, token_type_ids=types, mask=mask)

    def context(self, model: Model, hidden: Tensor, mask: Tensor) -> Context:
        encoder = self.encoder(model).encoder
        return {
            "mask": encoder.get_attention_mask(mask),
            "input_mask": mask,
            "relative_pos": encoder.get_rel_pos(hidden),
            "rel_embeddings": encoder.get_rel_embedding(),
            "conv": encoder.conv,
            "embeddings": hidden,
        }

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        out = layer(
            hidden, ctx["mask"], relative_pos=ctx["relative_pos"], rel_embeddings=ctx["rel_embeddings"]
        )[0]
        if index == 0 and ctx["conv"] is not None:
            out = ctx["conv"](ctx["embeddings"], out, ctx["input_mask"])
        return out

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        return model.classifier(model.dropout(model.pooler(hidden)))


class ModernBertFamily(Family):
    """ModernBERT: no token types; rotary positions; global and sliding-window layers, each with its
    own mask and rotary table; a final norm on the last layer's output; [CLS] or mean pooling."""

    model_types = ("modernbert",)
    base = "model"
    token_types = False
    packs = False  # pre-LN, gated, rotary: not BERT-shaped

    def layers(self, model: Model) -> nn.ModuleList:
        return self.encoder(model).layers

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        return self.encoder(model).embeddings(input_ids=ids)

    def context(self, model: Model, hidden: Tensor, mask: Tensor) -> Context:
        encoder = self.encoder(model)
        kwargs = {"config": model.config, "inputs_embeds": hidden, "attention_mask": mask}
        masks = {
            "full_attention": create_bidirectional_mask(**kwargs),
            "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs),
        }
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {kind: encoder.rotary_emb(hidden, positions, kind) for kind in set(model.config.layer_types)}
        return {"masks": masks, "rotary": rotary}

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        kind = layer.attention_type
        return layer(hidden, attention_mask=ctx["masks"][kind], position_embeddings=ctx["rotary"][kind])

    def last(self, model: Model, hidden: Tensor) -> Tensor:
        return self.encoder(model).final_norm(hidden)

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        if model.config.classifier_pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            pooled = hidden[:, 0]
        return model.classifier(model.drop(model.head(pooled)))


class DecoderFamily(Family):
    """Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma 2: ``*ForSequenceClassification`` over a decoder.

    Pre-norm layers with causal attention, rotary positions computed once per pass, grouped-query
    attention inside the layer; per layer a causal or sliding-window causal mask, as
    ``config.layer_types`` (or Mistral's ``sliding_window``) says; a final norm; ``score`` on the
    last real token (the model's own forward finds it as the last token that is not
    ``pad_token_id``: the same token whenever padding is padding).
    """

    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
    base = "model"
    token_types = False
    # Padded passes only. Packing a causal batch needs variable-length causal attention: on CUDA
    # flash-attn's varlen kernel (not a dependency here); on CPU either one block-diagonal mask
    # over all of a pass's tokens, whose scores grow with their square (8,192 tokens: 256 MiB per
    # head and layer), or each family's attention rerun per row inside its own layer; neither is here.
    packs = False
    causal = True

    def layers(self, model: Model) -> nn.ModuleList:
        return self.encoder(model).layers

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        return self.encoder(model).embed_tokens(ids)  # Gemma's scales by sqrt(hidden) itself

    def kinds(self, config: Any) -> list[str]:
        """Each layer's attention kind: ``full_attention`` or ``sliding_attention``."""
        kinds = getattr(config, "layer_types", None)
        if kinds:
            return list(kinds)[: config.num_hidden_layers]
        sliding = getattr(config, "sliding_window", None) is not None  # Mistral: every layer slides
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers

    def context(self, model: Model, hidden: Tensor, mask: Tensor) -> Context:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {"config": model.config, "inputs_embeds": hidden, "attention_mask": mask, "cache": None}
        build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        kinds = self.kinds(model.config)
        masks = {kind: build[kind](**kwargs, position_ids=positions) for kind in set(kinds)}
        return {
            "kinds": kinds,
            "masks": masks,
            "positions": positions,
            "rotary": self.rotary(model, hidden, positions),
        }

    def rotary(self, model: Model, hidden: Tensor, positions: Tensor) -> Any:
        return self.encoder(model).rotary_emb(hidden, positions)

    def position_embeddings(self, ctx: Context, kind: str) -> Any:
        return ctx["rotary"]

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        kind = ctx["kinds"][index]
        return layer(
            hidden,
            attention_mask=ctx["masks"][kind],
            position_embeddings=self.position_embeddings(ctx, kind),
            position_ids=ctx["positions"],
        )

    def last(self, model: Model, hidden: Tensor) -> Tensor:
        return self.encoder(model).norm(hidden)

    def pooled(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The last real token of each (right-aligned) row."""
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]

    def head(self, model: Model, hidden: Tensor, mask: Tensor) -> Tensor:
        return model.score(self.pooled(hidden, mask))

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings)


class Gemma3Family(DecoderFamily):
    """Gemma 3 (text): a rotary table per attention kind (local layers use their own base)."""

    model_types = ("gemma3_text",)

    def rotary(self, model: Model, hidden: Tensor, positions: Tensor) -> Any:
        rotary = self.encoder(model).rotary_emb
        return {kind: rotary(hidden, positions, kind) for kind in set(self.kinds(model.config))}

    def position_embeddings(self, ctx: Context, kind: str) -> Any:
        return ctx["rotary"][kind]


class GPT2Family(DecoderFamily):
    """GPT-2: absolute position embeddings added to the tokens', one causal mask, ``ln_f``."""

    model_types = ("gpt2",)
    base = "transformer"

    def layers(self, model: Model) -> nn.ModuleList:
        return self.encoder(model).h

    def embed(self, model: Model, ids: Tensor, types: Tensor | None, mask: Tensor) -> Tensor:
        gpt2 = self.encoder(model)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return gpt2.drop(gpt2.wte(ids) + gpt2.wpe(positions))

    def kinds(self, config: Any) -> list[str]:
        return ["full_attention"] * config.num_hidden_layers

    def rotary(self, model: Model, hidden: Tensor, positions: Tensor) -> Any:
        return None

    def layer(self, layer: nn.Module, index: int, hidden: Tensor, ctx: Context) -> Tensor:
        return layer(hidden, attention_mask=ctx["masks"]["full_attention"], position_ids=ctx["positions"])

    def last(self, model: Model, hidden: Tensor) -> Tensor:
        return self.encoder(model).ln_f(hidden)


FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (
        Family(),
        RobertaFamily(),
        ElectraFamily(),
        MPNetFamily(),
        DistilBertFamily(),
        DebertaV2Family(),
        ModernBertFamily(),
        DecoderFamily(),
        Gemma3Family(),
        GPT2Family(),
    )
    for model_type in family.model_types
}


def family_of(config: Any) -> Family:
    """The adapter for a config's ``model_type``; an unsupported one is refused in one line."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
