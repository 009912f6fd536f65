"""The patient loss's layer map: student state j <-> teacher state j·n/m, and width projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student_trainer.kd.alignment import LayerAlignment, layer_map, make_projection


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        (6, 12, [0, 2, 4, 6, 8, 10, 12]),  # the paper's BERT-base -> 6-layer student
        (2, 4, [0, 2, 4]),
        (2, 2, [0, 1, 2]),
        (3, 12, [0, 4, 8, 12]),
        (4, 6, [0, 1, 3, 4, 6]),  # not divisible: floor(j·n/m)
        (4, 2, [0, 0, 1, 1, 2]),  # student deeper than teacher: states share a partner
    ],
)
def test_layer_map_pairs_embeddings_and_last_layers(student: int, teacher: int, expected: list[int]) -> None:
    assert layer_map(student, teacher) == expected


def test_layer_map_rejects_empty_models() -> None:
    with pytest.raises(ValueError, match="layer counts"):
        layer_map(0, 12)


def test_alignment_asks_each_teacher_layer_once_and_gathers_per_student_state() -> None:
    alignment = LayerAlignment.between(4, 2)
    assert alignment.teacher_layers == (0, 1, 2)
    assert alignment.positions == (0, 0, 1, 1, 2)
    answer = torch.arange(3.0).view(1, 3, 1).expand(2, 3, 5)  # [B, requested layers, H]: value = layer
    gathered = alignment.gather(answer)
    assert gathered.shape == (2, 5, 5)
    assert gathered[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0]


def test_alignment_gathers_token_features_too() -> None:
    alignment = LayerAlignment.between(2, 4)
    answer = torch.randn(3, 3, 7, 8)  # [B, layers, L, H]
    assert torch.equal(alignment.gather(answer), answer)


def test_projection_only_when_widths_differ() -> None:
    assert isinstance(make_projection(32, 32), nn.Identity)
    projection = make_projection(32, 48)
    assert isinstance(projection, nn.Linear)
    assert projection(torch.randn(2, 3, 32)).shape == (2, 3, 48)
