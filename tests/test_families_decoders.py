"""Decoder (LLM) classifiers: Llama, Mistral, Qwen2/3, Gemma 1/2/3, GPT-2.

Early exit equals the model's own forward with right or left padding (the per-layer feature is
the last real token's state), skipped layers do not run, the FLOPs model matches FlopCounterMode
over what the engine runs, and a decoder's pass is padded (never packed)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.flops import encoder_forward_flops
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import QueryError, TeacherEngine
from tests.tiny_families import DECODER_CASES, save_tiny_family, tiny_family_model

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad , i hate it", "fun !"]
CASES = sorted(DECODER_CASES)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, TeacherEngine]:
    root = tmp_path_factory.mktemp("decoders")
    return {case: TeacherEngine.load(case, save_tiny_family(case, root / case)) for case in CASES}


def tokenized(engine: TeacherEngine, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    engine.tokenizer.padding_side = side
    ids, mask, _ = engine.tokenize(TEXTS)
    assert not bool(mask.all())  # padded
    return ids, mask


def own_forward(engine: TeacherEngine, ids: torch.Tensor, mask: torch.Tensor):
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states


@pytest.mark.parametrize("case", CASES)
def test_early_exit_equals_the_models_own_forward(engines, case):
    """Right padding: every layer's last-real-token state, every token's state and the logits
    equal the model's own forward at fp32 atol 1e-5, whole and each early exit alone."""
    engine = engines[case]
    ids, mask = tokenized(engine, "right")
    assert ids.shape[1] > 4  # longer than the sliding windows
    logits, hidden = own_forward(engine, ids, mask)
    every = tuple(range(engine.info.num_layers + 1))
    answer = engine.run(TeacherQuery(ids, mask, None, want_logits=True, cls_layers=every, token_layers=every))
    torch.testing.assert_close(answer.logits, logits, atol=1e-5, rtol=0)
    last = mask.sum(dim=1) - 1
    rows, real = torch.arange(len(TEXTS)), mask.bool()
    for layer in every:
        torch.testing.assert_close(answer.hidden_cls[:, layer], hidden[layer][rows, last], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            answer.hidden_states[:, layer][real], hidden[layer][real], atol=1e-5, rtol=0
        )
    for depth in every:
        alone = engine.run(TeacherQuery(ids, mask, None, want_logits=False, cls_layers=(depth,)))
        torch.testing.assert_close(alone.hidden_cls[:, 0], hidden[depth][rows, last], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_left_padding_answers_as_right_padding(engines, case):
    """A left-padded batch gets the right-padded batch's answers, its token states back at its
    own positions. The model's own forward numbers a left-padded row's positions from the first
    pad: rotary attention sees only differences, so it agrees; GPT-2's absolute positions do not."""
    engine = engines[case]
    every = tuple(range(engine.info.num_layers + 1))
    answers = {}
    for side in ("right", "left"):
        ids, mask = tokenized(engine, side)
        query = TeacherQuery(ids, mask, None, want_logits=True, cls_layers=every, token_layers=every)
        answers[side] = (mask, engine.run(query))
    (right_mask, right), (left_mask, left) = answers["right"], answers["left"]
    assert bool((left_mask[:, 0] == 0).any())
    torch.testing.assert_close(left.logits, right.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(left.hidden_cls, right.hidden_cls, atol=1e-5, rtol=0)
    for layer in every:
        torch.testing.assert_close(
            left.hidden_states[:, layer][left_mask.bool()],
            right.hidden_states[:, layer][right_mask.bool()],
            atol=1e-5,
            rtol=0,
        )
    assert float(left.hidden_states.transpose(1, 2)[~left_mask.bool()].abs().max()) == 0.0  # padding: zeros
    ids, mask = tokenized(engine, "left")
    logits, _ = own_forward(engine, ids, mask)
    if case == "gpt2":
        assert not torch.allclose(left.logits, logits, atol=1e-3)
    else:
        torch.testing.assert_close(left.logits, logits, atol=1e-5, rtol=0)


def test_a_row_padded_on_both_sides_is_refused(engines):
    engine = engines["llama"]
    ids = torch.tensor([[0, 7, 8, 0], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    with pytest.raises(QueryError, match="right or left padding") as err:
        engine.run(TeacherQuery(ids, mask, None, want_logits=True))
    assert err.value.field == "attention_mask"


@pytest.mark.parametrize("case", CASES)
def test_only_the_layers_needed_run_and_the_head_only_for_logits(engines, case):
    engine = engines[case]
    calls: list[object] = []
    layers = engine.family.layers(engine.model)
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, layer in enumerate(layers, start=1)
    ]
    hooks.append(engine.model.score.register_forward_hook(lambda m, i, o: calls.append("head")))
    try:
        ids, mask = tokenized(engine, "right")
        batch, length = ids.shape
        answer = engine.run(TeacherQuery(ids, mask, None, want_logits=False, cls_layers=(0, 1)))
        assert calls == [1]
        assert answer.padded_tokens == batch * length > answer.tokens  # padded, never packed
        assert answer.teacher_flops == encoder_forward_flops(
            engine.config, [length] * batch, 1, with_head=False
        )
        calls.clear()
        engine.run(TeacherQuery(ids, mask, None, want_logits=True))
        assert calls == [1, 2, 3, "head"]
    finally:
        for hook in hooks:
            hook.remove()


def counted(work) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES)
def test_flops_match_flop_counter(engines, case):
    """Eager attention (CPU SDPA hides attention from the counter): the engine's padded pass of
    a batch, and rows of several lengths alone, cost exactly what the FLOPs model says. The
    model's own forward scores every token and picks the last; the engine scores that one only."""
    engine = engines[case]
    engine.model.set_attn_implementation("eager")
    try:
        ids, mask = tokenized(engine, "right")
        batch, length = ids.shape
        query = TeacherQuery(ids, mask, None, want_logits=True)
        expected = encoder_forward_flops(engine.config, [length] * batch)
        assert counted(lambda: engine.run(query)) == engine.run(query).teacher_flops == expected
        for n in (5, 17, 30):
            row = torch.randint(5, engine.info.vocab_size, (1, n))
            one = TeacherQuery(row, torch.ones_like(row), None, want_logits=True)
            assert counted(lambda one=one: engine.run(one)) == encoder_forward_flops(engine.config, [n])
            own = counted(lambda row=row: engine.model(input_ids=row))
            assert (
                own == encoder_forward_flops(engine.config, [n]) + (n - 1) * 2 * 32 * engine.info.num_labels
            )
    finally:
        engine.model.set_attn_implementation("sdpa" if engine.model._supports_sdpa else "eager")


@pytest.mark.parametrize("case", ["llama", "gemma"])
def test_grouped_query_attention_and_head_dim_change_the_count(case):
    """The count reads the key-value heads and head_dim: half the key-value heads cost less,
    and Gemma's head_dim (16 × 4 heads = 64 wide on hidden 32) costs more than hidden/heads would."""
    config = tiny_family_model(case).config
    full = type(config)(**{**config.to_dict(), "num_key_value_heads": config.num_attention_heads})
    assert encoder_forward_flops(config, [20]) < encoder_forward_flops(full, [20])
    if case == "gemma":
        narrow = type(config)(**{**config.to_dict(), "head_dim": 8})
        assert encoder_forward_flops(narrow, [20]) < encoder_forward_flops(config, [20])
