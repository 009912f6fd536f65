"""The student: the first ``m`` layers of a pretrained BERT, a fresh classifier, and width projections.

The paper's student is the bottom 6 layers of BERT-base with a new task head. When the
patient loss compares hidden states with a teacher of another width, a learned linear map
per teacher brings the student's vectors to that width; those maps train with the student,
live in its checkpoints, and are dropped from the exported model (inference never needs them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.errors import UserError
from shared.teacher_api import TeacherInfo
from shared.vocabulary import vocab_sha256
from student_trainer.kd.alignment import make_projection
from teacher_engine.families import FAMILIES


class DistillStudent(nn.Module):
    """A sequence classifier plus one projection per teacher role (identity when widths agree)."""

    def __init__(self, model: PreTrainedModel, projections: Mapping[str, nn.Module]):
        super().__init__()
        self.model = model
        self.projections = nn.ModuleDict(dict(projections))

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        output_hidden_states: bool = False,
        then: Callable[[DistillStudent, torch.Tensor, tuple[torch.Tensor, ...] | None], Any] | None = None,
    ) -> Any:
        """Logits ``[B, K]`` and, on request, the ``m + 1`` hidden states ``[B, L, H]``; with ``then``,
        what ``then(self, logits, hidden_states)`` returns: a loss computed inside ``forward``, so that
        ``DistributedDataParallel`` sees every parameter it uses (the projections too)."""
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            output_hidden_states=output_hidden_states,
        )
        hidden_states = out.hidden_states if output_hidden_states else None
        return (out.logits, hidden_states) if then is None else then(self, out.logits, hidden_states)


def reset_classifier(model: PreTrainedModel) -> None:
    """Re-draw the task head so no label mapping leaks in from the pretrained checkpoint."""
    head = getattr(model, "classifier", None)
    if head is None:
        raise UserError(f"{type(model).__name__} has no `classifier` head to re-initialise")
    std = float(getattr(model.config, "initializer_range", 0.02))
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


_INDEX_NAME = re.compile(r"^(label_)?\d+$")  # "LABEL_0", "0": names that only restate the index


def teacher_label_order(role: str, info: TeacherInfo, data_labels: Sequence[str]) -> list[int] | None:
    """The teacher's logit columns in the data's label order, matched by name (case aside).

    ``None`` when the orders already agree, or when either side names its labels only by
    index (then the index is the contract). A teacher fine-tuned elsewhere may list the same
    classes in another order (``finetune --train_file`` sorts them; GLUE's MNLI does not):
    distilling column ``i`` into column ``i`` would then teach the wrong classes.
    """
    teacher = [str(n).lower() for n in info.label_names]
    data = [str(n).lower() for n in data_labels]
    if teacher == data or any(all(_INDEX_NAME.match(n) for n in side) for side in (teacher, data)):
        return None
    if sorted(teacher) != sorted(data) or len(set(data)) != len(data):
        raise UserError(
            f"teacher {role} labels {list(info.label_names)} are not the data's labels {list(data_labels)}: "
            "fine-tune the teacher on this task, or give it these label names (id2label in its config.json)"
        )
    return [teacher.index(name) for name in data]


def text_teachers(
    teachers: Mapping[str, TeacherInfo],
    tokenizer: PreTrainedTokenizerBase,
    student_vocab_size: int,
    *,
    all_token_features: bool,
) -> frozenset[str]:
    """The teachers that must get raw text: their ids would not mean the student's tokens.

    Decided by the vocabulary fingerprint the teacher publishes (:func:`shared.vocabulary.vocab_sha256`)
    against the student tokenizer's. A teacher that publishes none (an older service) gets ids and
    must at least have the student's vocabulary size. All-token features compare position by
    position, which means nothing across two tokenizations of a text, so they are refused.
    """
    mine = vocab_sha256(tokenizer)
    text = set()
    for role, info in teachers.items():
        if info.model_type is not None and info.model_type not in FAMILIES:
            raise UserError(
                f"teacher {role} is a {info.model_type!r} model, which this trainer cannot count; "
                f"supported families: {', '.join(sorted(FAMILIES))}"
            )
        if info.text_only:
            text.add(role)
        elif info.tokenizer_vocab_sha256 is not None:
            if info.tokenizer_vocab_sha256 != mine:
                text.add(role)
        elif info.vocab_size and info.vocab_size != student_vocab_size:  # 0: unknown (another v2 server)
            raise UserError(
                f"teacher {role} has a vocabulary of {info.vocab_size} tokens but the student has "
                f"{student_vocab_size}, and it publishes no tokenizer fingerprint to be sent text instead"
            )
    if text and all_token_features:
        raise UserError(
            f"--pt_features all-tokens needs teachers with the student's tokenizer, but teacher "
            f"{', '.join(sorted(text))} has its own vocabulary (token positions do not line up across "
            "tokenizers): use --pt_features cls"
        )
    return frozenset(text)


def check_label_counts(teachers: Mapping[str, TeacherInfo], num_labels: int) -> None:
    for role, info in teachers.items():
        if info.num_labels != num_labels:
            raise UserError(f"teacher {role} predicts {info.num_labels} labels but the data has {num_labels}")


def teacher_projections(model: PreTrainedModel, teachers: Mapping[str, TeacherInfo]) -> dict[str, nn.Module]:
    """One map per teacher from the student's hidden width to the teacher's (drawn from the global RNG)."""
    hidden = int(model.config.hidden_size)
    return {role: make_projection(hidden, info.hidden_size) for role, info in teachers.items()}
