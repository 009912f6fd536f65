"""The FLOPs ledger: teacher FLOPs spent vs vanilla KD, student FLOPs, sums across steps and ranks."""

from __future__ import annotations

import pytest
import torch

from shared.flops import encoder_forward_flops
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery
from student_trainer.kd.ledger import (
    KEYS,
    FlopsLedger,
    all_reduce_counts,
    requested_counts,
    student_counts,
    teacher_counts,
    teacher_flops_config,
    vanilla_counts,
)
from tests.tiny_models import tiny_config

BASE = TeacherInfo("large", 12, 768, 2, ("negative", "positive"), 30522, 512)


def answer(flops: int, hits: int = 0) -> TeacherAnswer:
    return TeacherAnswer(None, None, None, teacher_flops=flops, tokens=0, padded_tokens=0, cache_hits=hits)


def test_teacher_config_matches_bert_base() -> None:
    config = teacher_flops_config(BASE)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (768, 3072, 12)
    # DESIGN.md §2: BERT-base at 128 tokens is about 22.3 GFLOPs
    assert encoder_forward_flops(config, [128]) == pytest.approx(22.35e9, rel=0.01)


def test_teacher_config_uses_the_stated_ffn_width() -> None:
    tiny = TeacherInfo("small", 2, 32, 2, ("a", "b"), 100, 128, intermediate_size=64)
    assert teacher_flops_config(tiny).intermediate_size == 64


def test_vanilla_is_every_row_through_every_baseline_teacher() -> None:
    small = TeacherInfo("small", 2, 32, 2, ("a", "b"), 100, 128, intermediate_size=64)
    lengths = [20, 7, 12, 3]
    counts = vanilla_counts({"small": small, "large": BASE}, lengths, padded_len=20)
    assert counts["vanilla_rows_small"] == counts["vanilla_rows_large"] == 4
    assert counts["vanilla_flops_large"] == encoder_forward_flops(teacher_flops_config(BASE), [20] * 4)
    assert counts["vanilla_flops_small"] == encoder_forward_flops(teacher_flops_config(small), [20] * 4)
    assert counts["vanilla_unpadded_flops_large"] == encoder_forward_flops(
        teacher_flops_config(BASE), lengths
    )
    assert counts["vanilla_unpadded_flops_small"] < counts["vanilla_flops_small"]


def test_teacher_counts_take_the_reported_flops() -> None:
    counts = teacher_counts({"small": answer(100, hits=1), "large": answer(250)}, {"small": 3, "large": 4})
    assert counts == {
        "teacher_flops_small": 100,
        "teacher_flops_large": 250,
        "teacher_rows_small": 3,
        "teacher_rows_large": 4,
        "teacher_requests": 2,
        "teacher_cache_hits": 1,
    }


def test_requested_is_the_rows_sent_at_their_real_lengths_through_the_whole_teacher() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    query = TeacherQuery(torch.ones_like(mask), mask, None, want_logits=True)
    counts = requested_counts({"large": BASE}, {"large": query})
    assert counts == {"requested_flops_large": encoder_forward_flops(teacher_flops_config(BASE), [3, 4, 1])}


def test_selection_saving_compares_requested_with_unpadded_vanilla() -> None:
    ledger = FlopsLedger()
    assert ledger.selection_saved_fraction is None
    # a cache made the bill 0, yet every row was requested: dynamic KD itself saved nothing
    ledger.add({"teacher_flops_large": 0, "requested_flops_large": 500, "vanilla_unpadded_flops_large": 500})
    ledger.add({"vanilla_flops_large": 800})
    assert ledger.saved_fraction == 1.0 and ledger.selection_saved_fraction == 0.0
    ledger.add({"requested_flops_small": 100, "vanilla_unpadded_flops_small": 1500})
    assert ledger.selection_saved_fraction == pytest.approx(1 - 600 / 2000)
    assert ledger.summary()["teacher_flops_saved_fraction_selection"] == pytest.approx(0.7)


def test_student_backward_is_twice_forward() -> None:
    config = tiny_config(num_layers=2)
    counts = student_counts(config, batch_size=4, seq_len=10)
    assert counts["student_forward_flops"] == encoder_forward_flops(config, [10] * 4)
    assert counts["student_backward_flops"] == 2 * counts["student_forward_flops"]
    assert counts["instances"] == 4


def test_ledger_sums_steps_and_reports_the_saving() -> None:
    ledger = FlopsLedger()
    assert ledger.saved_fraction is None  # no teacher yet: nothing to compare
    for _ in range(3):
        ledger.add({"teacher_flops_small": 10, "vanilla_flops_small": 100, "vanilla_flops_large": 300})
        ledger.add({"teacher_flops_large": 30})
    assert ledger.teacher_flops == 120 and ledger.vanilla_flops == 1200
    assert ledger.saved_fraction == pytest.approx(0.9)
    assert ledger.saved_fraction_unpadded is None  # no unpadded bound recorded
    ledger.add({"vanilla_unpadded_flops_small": 240})
    assert ledger.saved_fraction_unpadded == pytest.approx(0.5)
    summary = ledger.summary()
    assert summary["teacher_flops_spent"] == 120
    assert summary["teacher_flops_saved_fraction"] == pytest.approx(0.9)


def test_ledger_state_round_trips_exactly_with_huge_counts() -> None:
    ledger = FlopsLedger({"teacher_flops_large": 3 * 10**17 + 1, "student_forward_flops": 7})
    restored = FlopsLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.totals == ledger.totals
    assert set(restored.totals) == set(KEYS)


def test_ledger_rejects_unknown_keys() -> None:
    with pytest.raises(KeyError, match="teacher_flops_medium"):
        FlopsLedger().add({"teacher_flops_medium": 1})


def test_all_reduce_without_a_process_group_fills_every_key() -> None:
    counts = all_reduce_counts({"teacher_flops_small": 5})
    assert counts["teacher_flops_small"] == 5 and set(counts) == set(KEYS)
    assert sum(counts.values()) == 5


def test_all_reduce_in_a_process_group_keeps_counts_exact(tmp_path) -> None:
    """Summing across ranks is covered by tests/test_ddp.py; here: int64 end to end."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counts = all_reduce_counts({"teacher_flops_large": 2**62, "instances": 8})
    finally:
        dist.destroy_process_group()
    assert counts["teacher_flops_large"] == 2**62  # a float64 would round this
    assert counts["instances"] == 8
