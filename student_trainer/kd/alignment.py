"""Which teacher hidden state each student hidden state learns from (the patient loss's layer map).

Hidden state ``j`` of a model is the output of its ``j``-th layer (0 = the embeddings), so a
student of ``m`` layers has ``m + 1`` of them. Student state ``j`` is paired with teacher state
``⌊j·n/m⌋`` (12 → 6: teacher 0, 2, 4, …, 12), first and last included, as in PKD-skip.
When the widths differ, a learned linear map takes the student's vectors to the teacher's
width before both are normalised (its weights are part of the trained state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher hidden-state index for each student hidden state ``j = 0..m``."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student={student_layers} teacher={teacher_layers}")
    return [j * teacher_layers // student_layers for j in range(student_layers + 1)]


@dataclass(frozen=True)
class LayerAlignment:
    """What to ask one teacher for and how its answer lines up with the student's states.

    ``teacher_layers`` is the (sorted, unique) list to request; ``positions[j]`` is where
    student state ``j``'s partner sits in the answer. A student deeper than its teacher maps
    several of its states onto one teacher state, which is asked for only once.
    """

    teacher_layers: tuple[int, ...]
    positions: tuple[int, ...]

    @classmethod
    def between(cls, student_layers: int, teacher_layers: int) -> LayerAlignment:
        mapped = layer_map(student_layers, teacher_layers)
        unique = tuple(sorted(set(mapped)))
        return cls(unique, tuple(unique.index(t) for t in mapped))

    def gather(self, teacher_states: torch.Tensor) -> torch.Tensor:
        """Teacher features ``[B, len(teacher_layers), ...]`` -> one per student state ``[B, m+1, ...]``."""
        return teacher_states[:, list(self.positions)]


def make_projection(student_hidden: int, teacher_hidden: int) -> nn.Module:
    """A linear map to the teacher's width, or the identity when the widths already agree."""
    if student_hidden == teacher_hidden:
        return nn.Identity()
    return nn.Linear(student_hidden, teacher_hidden)
