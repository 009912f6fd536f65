"""One teacher in memory: validate a query, run the encoder only as deep as needed, count FLOPs.

The service's batcher and the trainer's in-process client both call :meth:`TeacherEngine.run`,
so both sides return the same numbers and the same FLOPs accounting.

Early exit: for ``BertForSequenceClassification`` the engine runs the embeddings and the first
``k`` ``BertLayer``s itself (with the mask the model would build for its attention backend) and
the pooler + classifier only when logits are asked for. Other BERT-family heads (RoBERTa, …)
run the model's own forward with ``output_hidden_states`` and are charged every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.masking_utils import create_bidirectional_mask

from shared.flops import encoder_forward_flops, flops_per_token
from shared.modeling import load_sequence_classifier
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery
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
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.revision = revision
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.config = config
        self.early_exit = isinstance(model, BertForSequenceClassification)
        labels = tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels))
        self.info = TeacherInfo(
            name=name,
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_labels=int(config.num_labels),
            label_names=labels,
            vocab_size=int(config.vocab_size),
            max_seq_length=min(int(max_seq_length), int(config.max_position_embeddings)),
            intermediate_size=getattr(config, "intermediate_size", None),
        )
        self.flops_per_token = flops_per_token(config, min(128, self.info.max_seq_length))

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
    ) -> TeacherEngine:
        """Load checkpoint + tokenizer from a local dir or hub id (never ``trust_remote_code``)."""
        model = load_sequence_classifier(path, revision=revision, device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=False)
        return cls(name, model, tokenizer, revision=revision, max_seq_length=max_seq_length)

    # -- inputs -------------------------------------------------------------------------------

    def tokenize(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenize with the teacher's own tokenizer: (input_ids, attention_mask, token_type_ids).

        Each text is first cut to ``max_seq_length × MAX_CHARS_PER_TOKEN`` characters (see there).
        """
        if not texts:
            raise QueryError("text", "at least one text is required")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise QueryError("text_pair", f"has {len(text_pairs)} entries but text has {len(texts)}")
        chars = self.info.max_seq_length * MAX_CHARS_PER_TOKEN
        enc = self.tokenizer(
            [text[:chars] for text in texts],
            [pair[:chars] for pair in text_pairs] if text_pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=self.info.max_seq_length,
            return_tensors="pt",
            return_token_type_ids=True,
        )
        return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]

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
        if int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size:
            raise QueryError("input_ids", f"token ids must be in [0, {self.info.vocab_size})")
        mask = query.attention_mask
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise QueryError("attention_mask", f"shape must equal input_ids shape {list(ids.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise QueryError("attention_mask", "values must be 0 or 1")
        if not bool((mask[:, 0] == 1).all()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise QueryError("attention_mask", "each row must be 1s then 0s (right padding, [CLS] first)")
        types = query.token_type_ids
        if types is not None:
            if not isinstance(types, torch.Tensor) or types.shape != ids.shape:
                raise QueryError("token_type_ids", f"shape must equal input_ids shape {list(ids.shape)}")
            type_vocab = int(self.config.type_vocab_size)
            if int(types.min()) < 0 or int(types.max()) >= type_vocab:
                raise QueryError("token_type_ids", f"values must be in [0, {type_vocab})")
        for field, layers in (("cls_layers", query.cls_layers), ("token_layers", query.token_layers)):
            bad = [layer for layer in layers if not 0 <= int(layer) <= self.info.num_layers]
            if bad:
                raise QueryError(field, f"layers {bad} outside 0..{self.info.num_layers} (0 = embeddings)")
        if not (query.want_logits or query.cls_layers or query.token_layers):
            raise QueryError("outputs", "nothing requested: ask for logits and/or hidden states")

    # -- compute ------------------------------------------------------------------------------

    def run(self, query: TeacherQuery) -> TeacherAnswer:
        """Answer one padded batch: float32 CPU tensors plus the FLOPs actually run.

        Columns that are padding in every row are not run (they cost FLOPs and change nothing);
        ``hidden_states`` is padded back to the query's length with zeros.
        """
        self.validate(query)
        query_length = query.input_ids.shape[1]
        query = trim_padding(query)
        spec = OutputSpec.of(query)
        depth = spec.depth(self.info.num_layers)
        mask_cpu = query.attention_mask.long()
        ids, mask = self._to_device(query.input_ids), self._to_device(mask_cpu)
        types = self._to_device(query.token_type_ids) if query.token_type_ids is not None else None
        wanted = set(spec.cls_layers) | set(spec.token_layers)
        with torch.inference_mode():
            if self.early_exit:
                states, logits = self._forward_early_exit(ids, mask, types, depth, wanted, spec.want_logits)
            else:
                states, logits = self._forward_full(ids, mask, types)
                depth = self.info.num_layers
            hidden_cls = hidden_states = None
            if spec.cls_layers:
                hidden_cls = torch.stack([states[i][:, 0] for i in spec.cls_layers], dim=1).float().cpu()
            if spec.token_layers:
                stacked = torch.stack([states[i] for i in spec.token_layers], dim=1).float().cpu()
                hidden_states = stacked.mul_(mask_cpu[:, None, :, None])  # padding → exact zeros, in place
                if stacked.shape[2] < query_length:  # back to the query's length (trimmed columns)
                    hidden_states = F.pad(hidden_states, (0, 0, 0, query_length - stacked.shape[2]))
            logits = logits.float().cpu() if spec.want_logits else None
        batch, length = ids.shape
        flops = encoder_forward_flops(self.config, [length] * batch, depth, with_head=spec.want_logits)
        return TeacherAnswer(
            logits=logits,
            hidden_cls=hidden_cls,
            hidden_states=hidden_states,
            teacher_flops=flops,
            tokens=int(mask_cpu.sum()),
            padded_tokens=batch * length,
        )

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.long()
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _forward_early_exit(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None,
        depth: int,
        wanted: set[int],
        want_logits: bool,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Embeddings, then layers 1..depth; the head only when logits are requested."""
        bert = self.model.bert
        hidden = bert.embeddings(input_ids=ids, token_type_ids=types)
        states = {0: hidden} if 0 in wanted else {}
        attn_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for index, layer in enumerate(bert.encoder.layer[:depth], start=1):
            hidden = layer(hidden, attn_mask)
            if index in wanted:
                states[index] = hidden
        logits = None
        if want_logits:
            logits = self.model.classifier(self.model.dropout(bert.pooler(hidden)))
        return states, logits

    def _forward_full(
        self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        return dict(enumerate(out.hidden_states)), out.logits
