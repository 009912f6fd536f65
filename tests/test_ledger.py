"""The FLOPs ledger: teacher FLOPs spent vs vanilla KD, student FLOPs, sums across steps and ranks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.flops import encoder_forward_flops, flops_config
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.kd.ledger import (
    KEYS,
    FlopsLedger,
    all_reduce_counts,
    requested_counts,
    scaled_lengths,
    sent_lengths,
    student_counts,
    teacher_counts,
    teacher_flops_config,
    text_batch_lengths,
    vanilla_counts,
)
from tests.tiny_families import tiny_family_config
from tests.tiny_models import tiny_config

BASE = TeacherInfo("large", 12, 768, 2, ("negative", "positive"), 30522, 512)


def answer(flops: int, hits: int = 0, tokens: int = 0) -> TeacherAnswer:
    return TeacherAnswer(
        None, None, None, teacher_flops=flops, tokens=tokens, padded_tokens=tokens, cache_hits=hits
    )


def test_teacher_config_matches_bert_base() -> None:
    config = teacher_flops_config(BASE)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (768, 3072, 12)
    # docs/architecture.md, design choices: BERT-base at 128 tokens is about 22.3 GFLOPs
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
    counts = teacher_counts(
        {"small": answer(100, hits=1, tokens=30), "large": answer(250, tokens=41)},
        {"small": 3, "large": 4},
        {"small": 30, "large": 35},
    )
    assert counts == {
        "teacher_flops_small": 100,
        "teacher_flops_large": 250,
        "teacher_rows_small": 3,
        "teacher_rows_large": 4,
        "teacher_tokens_small": 30,
        "teacher_tokens_large": 41,
        "stored_tokens_small": 0,
        "stored_tokens_large": 0,
        "sent_student_tokens_small": 30,
        "sent_student_tokens_large": 35,
        "teacher_requests": 2,
        "teacher_cache_hits": 1,
        "teacher_store_hits": 0,
        "teacher_store_lookups": 0,
    }


def test_the_store_hit_rate_is_over_the_rows_looked_up() -> None:
    stored = dataclasses.replace(answer(0, tokens=0), store_hits=3, store_lookups=4)
    ledger = FlopsLedger()
    assert ledger.summary()["teacher_store_hit_rate"] is None  # nothing looked up
    for _ in range(2):
        ledger.add(teacher_counts({"small": stored}, {"small": 4}, {"small": 10}))
    summary = ledger.summary()
    assert (summary["teacher_store_hits"], summary["teacher_store_lookups"]) == (6, 8)
    assert summary["teacher_store_hit_rate"] == 0.75


def test_requested_is_the_rows_sent_at_their_real_lengths_through_the_whole_teacher() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    query = TeacherQuery(torch.ones_like(mask), mask, None, want_logits=True)
    sent = sent_lengths(query, answer(9, tokens=8), [3, 4, 1])
    assert sent == [3, 4, 1]
    counts = requested_counts({"large": BASE}, {"large": sent})
    assert counts == {"requested_flops_large": encoder_forward_flops(teacher_flops_config(BASE), [3, 4, 1])}


def test_a_published_flops_config_counts_as_the_teachers_own_family() -> None:
    published = flops_config(tiny_family_config("deberta-v3"))
    deberta = TeacherInfo("large", 3, 32, 3, ("a", "b", "c"), 100, 128, flops_config=published)
    config = teacher_flops_config(deberta)
    assert config.model_type == "deberta-v2" and config.relative_kinds > 0
    as_bert = TeacherInfo("large", 3, 32, 3, ("a", "b", "c"), 100, 128, intermediate_size=64)
    assert encoder_forward_flops(config, [10]) > encoder_forward_flops(teacher_flops_config(as_bert), [10])


def test_scaled_lengths_keep_the_total_exact() -> None:
    assert scaled_lengths([3, 4, 1], 1.0) == [3, 4, 1]
    scaled = scaled_lengths([5, 5, 5, 5], 1.3)  # 26 teacher tokens for 20 student tokens
    assert sum(scaled) == 26 and all(6 <= n <= 7 for n in scaled)


def test_a_text_answers_own_token_count_is_spread_over_its_rows() -> None:
    student = [4, 8, 2]  # the student's tokens of these rows; the teacher reports 21 of its own
    sent = sent_lengths(TextQuery(["a b c", "d e f g h i", "j k"]), answer(9, tokens=21), student)
    assert sent == scaled_lengths(student, 1.5) and sum(sent) == 21


def test_rows_the_answer_store_answered_are_requested_at_their_stored_lengths() -> None:
    """Free (no FLOPs, no tokens counted), but requested as when their teacher answered them."""
    student, texts = [4, 8, 2], TextQuery(["a b c", "d e f g h i", "j k"])
    stored = dataclasses.replace(answer(0), store_hits=2, store_lookups=3, store_tokens=15)
    assert sent_lengths(texts, stored, student) == sent_lengths(texts, answer(9, tokens=15), student)
    counts = teacher_counts({"large": stored}, {"large": 3}, {"large": 14})
    assert (counts["teacher_tokens_large"], counts["stored_tokens_large"], counts["teacher_flops_large"]) == (
        0, 15, 0,
    )  # fmt: skip
    ledger = FlopsLedger()
    ledger.add(counts)
    assert ledger.token_ratio("large", {}) == pytest.approx(15 / 14)  # stored rows measure lengths too


def test_vanilla_across_vocabularies_measures_sent_rows_and_scales_the_others() -> None:
    ledger = FlopsLedger()
    assert ledger.token_ratio("large", {}) == 1.0  # nothing sent yet: no evidence of another length
    ledger.add({"teacher_tokens_large": 30, "sent_student_tokens_large": 20})
    step = {"teacher_tokens_large": 15, "sent_student_tokens_large": 10}
    ratio = ledger.token_ratio("large", step)
    assert ratio == pytest.approx(1.5)
    lengths = [10, 6, 4]  # row 1 was sent and measured at 11 teacher tokens; the others are scaled
    text = text_batch_lengths(lengths, ratio, [1], [11])
    assert text == [15, 11, 6]
    counts = vanilla_counts({"large": BASE}, lengths, padded_len=10, text_lengths={"large": text})
    config = teacher_flops_config(BASE)
    assert counts["vanilla_unpadded_flops_large"] == encoder_forward_flops(config, [15, 11, 6])
    assert counts["vanilla_flops_large"] == encoder_forward_flops(config, [15] * 3)  # padded to the longest
    same_vocab = vanilla_counts({"large": BASE}, lengths, padded_len=10)
    assert same_vocab["vanilla_unpadded_flops_large"] == encoder_forward_flops(config, lengths)


def test_method_saving_compares_requested_with_unpadded_vanilla() -> None:
    ledger = FlopsLedger()
    assert ledger.method_saved_fraction is None
    # a cache made the bill 0, yet every row was requested: dynamic KD itself saved nothing
    ledger.add({"teacher_flops_large": 0, "requested_flops_large": 500, "vanilla_unpadded_flops_large": 500})
    ledger.add({"vanilla_flops_large": 800})
    assert ledger.saved_fraction == 1.0 and ledger.method_saved_fraction == 0.0
    assert ledger.service_saved_fraction == 1.0  # the cache's saving is the service's
    ledger.add(
        {"requested_flops_small": 100, "vanilla_unpadded_flops_small": 1500, "teacher_flops_small": 150}
    )
    assert ledger.method_saved_fraction == pytest.approx(1 - 600 / 2000)
    assert ledger.service_saved_fraction == pytest.approx(1 - 150 / 600)
    summary = ledger.summary()
    assert summary["teacher_flops_saved_by_method"] == pytest.approx(0.7)
    assert summary["teacher_flops_saved_by_service"] == pytest.approx(0.75)
    assert list(summary).index("teacher_flops_saved_by_method") < list(summary).index(
        "teacher_flops_saved_fraction"
    )


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
