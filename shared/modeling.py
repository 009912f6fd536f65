"""Loading BERT-family sequence classifiers the same way on both sides of the wire.

Never ``trust_remote_code``: a checkpoint is data, not code. ``num_layers`` keeps only the
first ``m`` encoder layers (the paper's student: the first 6 layers of BERT-base).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from shared.errors import UserError
from shared.model_path import require_model_dir
from teacher_engine.families import family_of

log = logging.getLogger(__name__)

# ``from_pretrained`` swaps ``torch.nn.init`` (and we swap the logging verbosity) process-wide
# while it loads, then puts back what it found: two loads in threads (a trainer starting both
# local teachers at once) can each put back the other's no-ops, after which every ``nn.init``
# call (the student's fresh head) leaves memory uninitialised. One load at a time per process.
_LOAD_LOCK = threading.Lock()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``fp32``/``fp16``/``bf16`` (or torch names) to a dtype, with a clear error."""
    aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[key]


def load_sequence_classifier(
    name_or_path: str | Path,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    num_layers: int | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    attn_implementation: str | None = None,
    lm_head: bool = False,
) -> PreTrainedModel:
    """Load a checkpoint (local dir or hub id) as ``AutoModelForSequenceClassification``.

    ``label_names`` (or ``num_labels``) replace the head when the checkpoint has none or a
    different one; ``num_layers`` truncates the encoder before the weights are loaded (any family
    of :mod:`teacher_engine.families`: ModernBERT's per-layer attention kinds are cut with it).
    ``attn_implementation`` None: SDPA where the family has it (MPNet and DeBERTa have not), else eager.
    ``lm_head``: the causal LM with its language-model head (a prompted teacher), not a classifier.
    """
    require_model_dir(name_or_path)
    kwargs: dict = {"revision": revision, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load model config from {name_or_path!r}: {first}") from err
    family_of(config)  # an unsupported model_type is refused in one line, before any weights load
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    elif num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels
        config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise UserError(
                f"num_layers={num_layers} must be in 1..{config.num_hidden_layers} for {name_or_path}"
            )
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):  # ModernBERT: one kind per layer
            config.layer_types = config.layer_types[:num_layers]
    with _LOAD_LOCK:
        # transformers prints a multi-screen "LOAD REPORT" listing every dropped layer's weights
        # when we truncate on purpose; one line saying what is new is what a user needs.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            auto: Any = AutoModelForCausalLM if lm_head else AutoModelForSequenceClassification
            model, loading = auto.from_pretrained(
                str(name_or_path),
                config=config,
                dtype=resolve_dtype(dtype),
                attn_implementation=attn_implementation,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    mismatched = (k if isinstance(k, str) else k[0] for k in loading.get("mismatched_keys", ()))
    fresh = sorted({*loading.get("missing_keys", ()), *mismatched})
    if fresh:
        log.info("%s: newly initialised (train them): %s", name_or_path, ", ".join(fresh))
    return model.to(device)
