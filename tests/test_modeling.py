"""Loading checkpoints: concurrent loads (both local teachers start in threads) leave torch intact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import PreTrainedModel

from shared.modeling import load_sequence_classifier


def test_concurrent_loads_leave_weight_initialisation_working(tiny_teachers: dict[str, Path]) -> None:
    """``from_pretrained`` swaps ``torch.nn.init`` for no-ops while it loads; two unguarded loads
    in threads can restore each other's no-ops for good, and every later ``nn.init`` call (the
    student's fresh head) silently leaves memory uninitialised."""
    originals = (torch.nn.init.normal_, torch.nn.init.zeros_, PreTrainedModel.init_weights)
    paths = [tiny_teachers["small"], tiny_teachers["large"]] * 8
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        for _ in range(3):  # unguarded, one round breaks torch about half the time on 2 cores
            models = list(pool.map(load_sequence_classifier, paths))
            assert (torch.nn.init.normal_, torch.nn.init.zeros_, PreTrainedModel.init_weights) == originals
            assert len(models) == len(paths)
    weight = torch.full((4, 4), float("nan"))
    torch.nn.init.normal_(weight)
    assert torch.isfinite(weight).all()
