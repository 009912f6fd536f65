"""One teacher in memory: validate a query, run the model only as deep as needed, count FLOPs.

The service's batcher and the trainer's in-process client both call :meth:`TeacherEngine.run`,
so both sides return the same numbers and the same FLOPs accounting.

Early exit, for every family in :mod:`teacher_engine.families` (encoders: BERT, RoBERTa, XLM-R,
ELECTRA, MPNet, DistilBERT, DeBERTa-v2/v3, ModernBERT; decoder classifiers: Llama, Mistral,
Qwen2/3, Gemma 1/2/3, GPT-2): the engine runs the embeddings and the first ``k`` layers itself,
through the family's adapter (with the masks and position extras the model would build), and the
head only when logits are asked for. Other model types are refused at load. A decoder's rows may
come left-padded: the engine computes them right-aligned and puts token states back in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.errors import UserError
from shared.flops import (
    FlopsShape,
    encoder_forward_flops,
    flops_config,
    flops_per_token,
    layer_forward_flops,
)
from shared.modeling import load_sequence_classifier
from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery
from shared.vocabulary import tokenizer_parameters
from teacher_engine.families import family_of
from teacher_engine.packing import LayerProducts, Packing, packed_layer
from teacher_engine.prompting import LabelWordHead, label_token_ids, rendered
from teacher_engine.tokenizing import BatchTokenizer
from teacher_server.config import TeacherConfig
from teacher_server.errors import Unprocessable

# Texts are cut to max_seq_length × this many characters before tokenizing. The tokenizer keeps
# only max_seq_length tokens anyway, and ordinary text averages far fewer than 64 characters per
# token, so for it the cut changes nothing (text made of words longer than WordPiece's 100
# characters, each one [UNK], can lose tokens); it stops an 8 MB text from holding the event
# loop for seconds while it is tokenized whole.
MAX_CHARS_PER_TOKEN = 64


def trim_padding(query: TeacherQuery) -> TeacherQuery:
    """The query without the columns that are padding in every row (right padding, validated)."""
    width = max(1, int(query.attention_mask.sum(dim=1).max()))
    if width == query.input_ids.shape[1]:
        return query
    types = query.token_type_ids
    return replace(
        query,
        input_ids=query.input_ids[:, :width],
        attention_mask=query.attention_mask[:, :width],
        token_type_ids=None if types is None else types[:, :width],
    )


def right_aligned(query: TeacherQuery) -> tuple[TeacherQuery, torch.Tensor | None]:
    """A validated query with left-padded rows turned into right-padded ones (the layout the
    engine computes in, so positions start at 0 in every row), and each row's shift, or None
    when no row was left-padded."""
    mask = query.attention_mask
    pads = mask.shape[1] - mask.sum(dim=1) if bool((mask[:, 0] == 0).any()) else None
    if pads is None:
        return query, None
    index = (torch.arange(mask.shape[1]) + pads[:, None]) % mask.shape[1]
    types = query.token_type_ids
    return replace(
        query,
        input_ids=query.input_ids.gather(1, index),
        attention_mask=mask.gather(1, index),
        token_type_ids=None if types is None else types.gather(1, index),
    ), pads


def realigned(answer: TeacherAnswer, pads: torch.Tensor | None) -> TeacherAnswer:
    """An answer to :func:`right_aligned`'s query with ``hidden_states`` back where the caller's
    left-padded rows had their tokens."""
    states = answer.hidden_states
    if pads is None or states is None:
        return answer
    length = states.shape[2]
    index = (torch.arange(length) - pads[:, None]) % length
    return replace(answer, hidden_states=states.gather(2, index[:, None, :, None].expand(states.shape)))


def padded_cost(rows: int, longest: int, length: int) -> float:
    """Tokens of compute that padding ``rows`` rows from ``longest`` to ``length`` tokens adds
    to a padded pass: every padded position runs the whole layer."""
    return rows * (length - longest)


def _row(query: TeacherQuery, i: int) -> TeacherQuery:
    """Row ``i`` of a query, as a query of one."""
    types = query.token_type_ids
    return replace(
        query,
        input_ids=query.input_ids[i : i + 1],
        attention_mask=query.attention_mask[i : i + 1],
        token_type_ids=None if types is None else types[i : i + 1],
    )


class QueryError(Unprocessable, ValueError):
    """A query the teacher cannot answer; ``field`` names the input at fault (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class OutputSpec:
    """Which outputs a query needs, and so how deep the encoder must run."""

    want_logits: bool
    cls_layers: tuple[int, ...]
    token_layers: tuple[int, ...]

    @classmethod
    def of(cls, query: TeacherQuery) -> OutputSpec:
        return cls(bool(query.want_logits), tuple(query.cls_layers), tuple(query.token_layers))

    def depth(self, num_layers: int) -> int:
        """Layers to run: all of them for logits, else the deepest hidden state asked for."""
        if self.want_logits:
            return num_layers
        return max((*self.cls_layers, *self.token_layers), default=0)

    def wanted(self) -> set[int]:
        """Every hidden state asked for, [CLS] or all tokens."""
        return set(self.cls_layers) | set(self.token_layers)

    def first_token_only(self, depth: int) -> bool:
        """Nobody reads the last layer run beyond [CLS] (logits, [CLS] states): a packed pass
        computes only that token there."""
        return depth not in self.token_layers


class TeacherEngine:
    """A loaded teacher (model + its own tokenizer) answering :class:`TeacherQuery` batches."""

    def __init__(
        self,
        name: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        revision: str | None = None,
        max_seq_length: int = 512,
        batch_invariant: bool = False,
        prompt: LabelPrompt | None = None,
    ):
        config: Any = model.config  # any family's config, read by field name
        self.family = family_of(config)  # before anything else: an unknown model_type is refused
        self.model = model.eval()
        self.prompt = prompt
        self.batch_invariant = batch_invariant
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # LLM tokenizers often have none
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked, whatever its id
        self.tokenizer = tokenizer
        self.revision = revision
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.config = config
        self.type_vocab_size = self.family.type_vocab_size(config)
        self.packs = self.family.packs
        layers = self.family.layers(model) if self.packs else ()  # their products, prepared once
        self.packed_layers = tuple(LayerProducts.of(self.family.parts(layer)) for layer in layers)
        self.flops_shape = FlopsShape.of(config)
        labels = tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels))
        self.label_head: LabelWordHead | None = None
        if prompt is not None:
            self.label_head = self._label_head(prompt)
            labels = prompt.labels  # the head's rows are the label words: that is what a pass costs
            self.flops_shape = replace(self.flops_shape, num_labels=self.label_head.rows, pooler=False)
        self.info = TeacherInfo(
            name=name,
            num_layers=len(self.family.layers(model)),
            hidden_size=int(config.hidden_size),
            num_labels=len(labels),
            label_names=labels,
            vocab_size=int(config.vocab_size),
            max_seq_length=min(int(max_seq_length), self.family.max_positions(config)),
            intermediate_size=FlopsShape.of(config).intermediate_size,
            model_type=str(config.model_type),
            **tokenizer_parameters(tokenizer),
            flops_config=flops_config(self.flops_shape),
        )
        self.batch_tokenizer = BatchTokenizer(tokenizer, self.info.max_seq_length, self.type_vocab_size > 0)
        self.flops_per_token = flops_per_token(self.flops_shape, min(128, self.info.max_seq_length))
        shape = self.flops_shape
        token = layer_forward_flops(shape.hidden_size, shape.intermediate_size, 1, shape.ffn_matrices, 0)
        self._pair_tokens = 4 * shape.hidden_size / token  # one attention pair, in tokens' worth

    def _label_head(self, prompt: LabelPrompt) -> LabelWordHead:
        """The LM head's label-word rows, for a causal LM with a chat template where one is asked."""
        lm_head = getattr(self.model, "lm_head", None)
        if not self.family.causal or not isinstance(lm_head, torch.nn.Linear):
            raise UserError(
                f"a prompted teacher needs a causal LM with an lm_head; {self.config.model_type!r} "
                f"loaded as {type(self.model).__name__}"
            )
        if prompt.chat and not getattr(self.tokenizer, "chat_template", None):
            raise UserError("chat: true, but the tokenizer has no chat template")
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return LabelWordHead(lm_head, label_token_ids(prompt, self.tokenizer), softcap)

    def _head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output: the family's head, or the label words'."""
        if self.label_head is not None:
            return self.label_head(self.family.pooled(hidden, mask))
        return self.family.head(self.model, hidden, mask)

    def padding_cost(self, rows: int, longest: int, length: int) -> float:
        """Tokens of compute that padding ``rows`` rows from ``longest`` to ``length`` adds to a
        pass (the batcher's bucketing weighs it against a pass's overhead): all of it padded,
        only attention's pairs packed."""
        if not self.packs:
            return padded_cost(rows, longest, length)
        return rows * (length * length - longest * longest) * self._pair_tokens

    @classmethod
    def load(
        cls,
        name: str,
        path: str | Path,
        *,
        revision: str | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
        max_seq_length: int = 512,
        batch_invariant: bool = False,
        prompt: LabelPrompt | None = None,
    ) -> TeacherEngine:
        """Load checkpoint + tokenizer from a local dir or hub id (never ``trust_remote_code``);
        with a ``prompt``, the checkpoint's causal LM and its LM head."""
        lm_head = prompt is not None
        model = load_sequence_classifier(path, revision=revision, device=device, dtype=dtype, lm_head=lm_head)
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=False)
        return cls(
            name,
            model,
            tokenizer,
            revision=revision,
            max_seq_length=max_seq_length,
            batch_invariant=batch_invariant,
            prompt=prompt,
        )

    @classmethod
    def from_config(cls, teacher: TeacherConfig) -> TeacherEngine:
        """The engine a config entry describes: the service and the local client load alike."""
        return cls.load(
            teacher.name,
            teacher.path,
            revision=teacher.revision,
            device=teacher.device,
            dtype=teacher.dtype,
            max_seq_length=teacher.max_seq_length,
            batch_invariant=teacher.batch_invariant,
            prompt=teacher.label_prompt(),
        )

    # -- inputs -------------------------------------------------------------------------------

    def tokenize(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tokenize with the teacher's own tokenizer: (input_ids, attention_mask, token_type_ids).

        Each text is first cut to ``max_seq_length × MAX_CHARS_PER_TOKEN`` characters (see there).
        """
        if not texts:
            raise QueryError("text", "at least one text is required")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise QueryError("text_pair", f"has {len(text_pairs)} entries but text has {len(texts)}")
        chars = self.info.max_seq_length * MAX_CHARS_PER_TOKEN
        texts = [text[:chars] for text in texts]
        pairs = [pair[:chars] for pair in text_pairs] if text_pairs is not None else None
        if self.prompt is not None:
            return self._tokenize_prompts(rendered(self.prompt, self.tokenizer, texts, pairs))
        return self.batch_tokenizer(texts, pairs)

    def _tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Whole prompts or none: cutting one would cut the question the label words answer."""
        chat = self.prompt is not None and self.prompt.chat  # the chat template has its own specials
        enc = self.tokenizer(prompts, padding=True, add_special_tokens=not chat, return_tensors="pt")
        lengths = enc["attention_mask"].sum(dim=1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n > self.info.max_seq_length]
        if too_long:
            raise QueryError(
                "text",
                f"rows {too_long[:8]}: the prompt has up to {int(lengths.max())} tokens, over "
                f"max_seq_length {self.info.max_seq_length}",
            )
        return enc["input_ids"], enc["attention_mask"], None

    def validate(self, query: TeacherQuery) -> None:
        """Reject what would crash or silently mislead the model, naming the input at fault."""
        ids = query.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise QueryError("input_ids", "must be an integer tensor of shape [batch, length]")
        batch, length = ids.shape
        if batch < 1 or length < 1:
            raise QueryError("input_ids", f"shape {list(ids.shape)} is empty")
        if length > self.info.max_seq_length:
            raise QueryError(
                "input_ids", f"length {length} exceeds max_seq_length {self.info.max_seq_length}"
            )
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= self.info.vocab_size:
            raise QueryError("input_ids", f"token ids must be in [0, {self.info.vocab_size})")
        mask = query.attention_mask
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise QueryError("attention_mask", f"shape must equal input_ids shape {list(ids.shape)}")
        lengths = mask.sum(dim=1)
        right_padded = (torch.arange(length, device=mask.device) < lengths[:, None]).to(mask.dtype)
        if not torch.equal(mask, right_padded) or int(lengths.min()) < 1:  # few ops when it holds
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise QueryError("attention_mask", "values must be 0 or 1")
            left_padded = torch.equal(mask, right_padded.flip(1))
            if not (self.family.causal and left_padded and int(lengths.min()) >= 1):
                raise QueryError("attention_mask", self._padding_rule)
        types = query.token_type_ids
        if types is not None:
            if not isinstance(types, torch.Tensor) or types.shape != ids.shape:
                raise QueryError("token_type_ids", f"shape must equal input_ids shape {list(ids.shape)}")
            type_vocab = max(1, self.type_vocab_size)  # a model without token types accepts all zeros
            low, high = torch.aminmax(types)
            if int(low) < 0 or int(high) >= type_vocab:
                raise QueryError("token_type_ids", f"values must be in [0, {type_vocab})")
        for field, layers in (("cls_layers", query.cls_layers), ("token_layers", query.token_layers)):
            bad = [layer for layer in layers if not 0 <= int(layer) <= self.info.num_layers]
            if bad:
                raise QueryError(field, f"layers {bad} outside 0..{self.info.num_layers} (0 = embeddings)")
        if not (query.want_logits or query.cls_layers or query.token_layers):
            raise QueryError("outputs", "nothing requested: ask for logits and/or hidden states")

    @property
    def _padding_rule(self) -> str:
        if self.family.causal:
            return "each row must be 1s then 0s or 0s then 1s (right or left padding), with at least one 1"
        return "each row must be 1s then 0s (right padding, [CLS] first)"

    # -- compute ------------------------------------------------------------------------------

    def run(self, query: TeacherQuery) -> TeacherAnswer:
        """Answer one padded batch: float32 CPU tensors plus the FLOPs actually run."""
        self.validate(query)
        aligned, pads = right_aligned(query)
        return realigned(self.compute(aligned), pads)

    def compute(self, query: TeacherQuery) -> TeacherAnswer:
        """:meth:`run` for a query already validated (the batcher validates each request as it
        arrives, and merges only those).

        Columns that are padding in every row are not run (they cost FLOPs and change nothing);
        a batch runs packed where the family allows (the per-token matrices on real tokens only,
        so ``padded_tokens`` counts those), one without padding too, for the packed layer's matrix
        kernels (:func:`~teacher_engine.packing.linear`: 1.4x on one row, 1.6x on 8 equal rows of
        MiniLM-L6, one CPU thread); of the last layer run, only the first token where nothing else
        of it is read, whatever the rows beside, so a row's FLOPs do not depend on them;
        ``hidden_states`` is padded back to the query's length with zeros.
        """
        if self.batch_invariant and query.input_ids.shape[0] > 1:
            return self._run_rows(query)
        query_length = query.input_ids.shape[1]
        query = trim_padding(query)
        spec = OutputSpec.of(query)
        depth = spec.depth(self.info.num_layers)
        mask_cpu = query.attention_mask.long()
        ids, mask = self._to_device(query.input_ids), self._to_device(mask_cpu)
        given = query.token_type_ids if self.type_vocab_size > 0 else None
        types = None if given is None else self._to_device(given)
        lengths = mask_cpu.sum(dim=1)
        batch, length = ids.shape
        first_token_last = self.packs and spec.first_token_only(depth)
        with torch.inference_mode():
            if self.packs:
                states, logits = self._forward_packed(ids, mask, types, spec, depth, first_token_last)
            else:
                states, logits = self._forward_early_exit(ids, mask, types, spec, depth)
            hidden_cls = hidden_states = None
            if spec.cls_layers:
                pooled = [self.family.pooled(states[i], mask) for i in spec.cls_layers]
                hidden_cls = torch.stack(pooled, dim=1).float().cpu()
            if spec.token_layers:
                stacked = torch.stack([states[i] for i in spec.token_layers], dim=1).float().cpu()
                hidden_states = stacked.mul_(mask_cpu[:, None, :, None])  # padding → exact zeros, in place
                if stacked.shape[2] < query_length:  # back to the query's length (trimmed columns)
                    hidden_states = F.pad(hidden_states, (0, 0, 0, query_length - stacked.shape[2]))
            logits = logits.float().cpu() if logits is not None and spec.want_logits else None
        run_lengths = lengths.tolist() if self.packs else [length] * batch
        flops = encoder_forward_flops(
            self.flops_shape,
            run_lengths,
            depth,
            with_head=spec.want_logits,
            batches=1,
            attention_len=length,
            first_token_last=first_token_last,
        )
        return TeacherAnswer(
            logits=logits,
            hidden_cls=hidden_cls,
            hidden_states=hidden_states,
            teacher_flops=flops,
            tokens=int(lengths.sum()),
            padded_tokens=sum(run_lengths),
        )

    def _run_rows(self, query: TeacherQuery) -> TeacherAnswer:
        """Each row alone at its own length, so its answer never depends on the rows beside it.

        CPU and GPU matrix kernels pick their blocking from the whole batch's shape, so a row
        computed among others differs from the same row alone in the last bits; a grid of
        experiments sharing the service's cache must get the same answer whoever asked first.
        """
        rows = [self.compute(_row(query, i)) for i in range(query.input_ids.shape[0])]
        length = query.input_ids.shape[1]

        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(answer, name) for answer in rows]
            if parts[0] is None:
                return None
            if name == "hidden_states":  # back to the query's length (each row ran at its own)
                parts = [F.pad(p, (0, 0, 0, length - p.shape[2])) for p in parts]
            return torch.cat(parts)

        return TeacherAnswer(
            logits=cat("logits"),
            hidden_cls=cat("hidden_cls"),
            hidden_states=cat("hidden_states"),
            teacher_flops=sum(answer.teacher_flops for answer in rows),
            tokens=sum(answer.tokens for answer in rows),
            padded_tokens=sum(answer.padded_tokens for answer in rows),
        )

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.long()
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _forward_early_exit(
        self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None, spec: OutputSpec, depth: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Embeddings, then layers 1..depth; the head only when logits are requested."""
        family, model = self.family, self.model
        wanted = spec.wanted()
        hidden = family.project(model, family.embed(model, ids, types, mask))
        states = {0: hidden} if 0 in wanted else {}
        context = family.context(model, hidden, mask)
        layers = family.layers(model)
        for index, layer in enumerate(layers[:depth]):
            hidden = family.layer(layer, index, hidden, context)
            if index + 1 == len(layers):
                hidden = family.last(model, hidden)
            if index + 1 in wanted:
                states[index + 1] = hidden
        logits = self._head(hidden, mask) if spec.want_logits else None
        return states, logits

    def _forward_packed(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None,
        spec: OutputSpec,
        depth: int,
        first_token_last: bool,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """:meth:`_forward_early_exit` with the layers on packed tokens (:mod:`teacher_engine.packing`);
        the states asked for come back padded, and the head reads each row's first token. With
        ``first_token_last`` (only that token is read of the last layer) it alone is computed there
        (a state ``[batch, 1, H]``)."""
        family, model = self.family, self.model
        wanted = spec.wanted()
        embedded = family.embed(model, ids, types, mask)
        packing = Packing.of(mask, family.packed_bias(model, embedded, mask))
        hidden = family.project(model, packing.pack(embedded))
        states = {0: packing.unpack(hidden)} if 0 in wanted else {}
        for index, layer in enumerate(self.packed_layers[:depth]):
            alone = first_token_last and index + 1 == depth
            hidden = packed_layer(layer, hidden, packing, first_tokens_only=alone)
            if index + 1 == len(self.packed_layers):
                hidden = family.last(model, hidden)
            if index + 1 in wanted:
                states[index + 1] = hidden.unsqueeze(1) if alone else packing.unpack(hidden)
        if spec.want_logits:
            cls = hidden.unsqueeze(1) if first_token_last else packing.first_tokens(hidden)
            return states, self._head(cls, mask)
        return states, None
