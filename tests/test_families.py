"""Every supported family: early exit equals the model's own forward, skipped layers really do not
run, the FLOPs model matches FlopCounterMode, and "the first m layers" makes a student."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from shared.errors import UserError
from shared.flops import encoder_forward_flops
from shared.modeling import load_sequence_classifier
from shared.teacher_api import TeacherQuery
from teacher_engine import packing
from teacher_engine.engine import TeacherEngine
from teacher_engine.families import FAMILIES, family_of
from tests.tiny_families import ALL_CASES, FAMILY_CASES, save_tiny_family, tiny_family_model
from tests.tiny_models import layer_probe

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad , i hate it", "fun !"]
PAIRS = ["i like it", "not great", "the best film of the year"]
CASES = sorted(FAMILY_CASES)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, TeacherEngine]:
    root = tmp_path_factory.mktemp("families")
    return {case: TeacherEngine.load(case, save_tiny_family(case, root / case)) for case in CASES}


def own_forward(engine: TeacherEngine, ids, mask, types):
    """The model's own forward: logits and every hidden state."""
    kwargs = {"token_type_ids": types} if types is not None else {}
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    return out.logits, out.hidden_states


def test_every_model_type_has_an_adapter():
    assert {model_type for model_type, _ in ALL_CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("case", CASES)
def test_early_exit_equals_the_models_own_forward(engines, monkeypatch, case, packs):
    engine = engines[case]
    monkeypatch.setattr(engine, "packs", packs and engine.family.packs)
    ids, mask, types = engine.tokenize(TEXTS, PAIRS)
    if types is not None and engine.type_vocab_size < 2:  # RoBERTa's own tokenizer gives all zeros
        types = torch.zeros_like(types)
    assert ids.shape[1] > 8 and not bool(mask.all())  # longer than ModernBERT's window, padded
    logits, hidden = own_forward(engine, ids, mask, types)
    assert len(hidden) == engine.info.num_layers + 1 == 4
    every = tuple(range(engine.info.num_layers + 1))
    answer = engine.run(
        TeacherQuery(ids, mask, types, want_logits=True, cls_layers=every, token_layers=every)
    )
    torch.testing.assert_close(answer.logits, logits, atol=1e-5, rtol=0)
    real = mask.bool()
    for layer in every:
        torch.testing.assert_close(answer.hidden_cls[:, layer], hidden[layer][:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            answer.hidden_states[:, layer][real], hidden[layer][real], atol=1e-5, rtol=0
        )
    for depth in range(engine.info.num_layers + 1):  # each early exit alone
        alone = engine.run(TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(depth,)))
        torch.testing.assert_close(alone.hidden_cls[:, 0], hidden[depth][:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_only_the_layers_needed_run_and_the_head_only_for_logits(engines, case):
    engine = engines[case]
    family, model = engine.family, engine.model
    calls: list[object] = []
    hooks = [
        layer_probe(engine, layer).register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, layer in enumerate(family.layers(model), start=1)
    ]
    head = model.classifier  # every family's last module of the head
    hooks.append(head.register_forward_hook(lambda m, i, o: calls.append("head")))
    try:
        ids, mask, types = engine.tokenize(TEXTS)
        batch, length = ids.shape
        answer = engine.run(TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(0, 1)))
        assert calls == [1]
        ran = mask.sum(dim=1).tolist() if engine.packs else [length] * batch  # packed: real tokens
        assert answer.teacher_flops == encoder_forward_flops(
            engine.config,
            ran,
            1,
            with_head=False,
            batches=1,
            attention_len=length,
            first_token_last=engine.packs,
        )
        calls.clear()
        engine.run(TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(0,)))
        assert calls == []
        engine.run(TeacherQuery(ids, mask, types, want_logits=True))
        assert calls == [1, 2, 3, "head"]
    finally:
        for hook in hooks:
            hook.remove()


def measured_flops(model, lengths: list[int], batch: int = 1) -> int:
    """FlopCounterMode over the model's own forward, ``batch`` equal-length rows per call
    (autograd on: the counter's module tracker fails on DeBERTa's convolution under no_grad)."""
    counter = FlopCounterMode(display=False)
    with counter:
        for n in lengths:
            ids = torch.randint(5, model.config.vocab_size, (batch, n))
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES)
def test_flops_match_flop_counter(case):
    model = tiny_family_model(case)
    model.set_attn_implementation("eager")
    lengths = [5, 17, 30]
    expected = measured_flops(model, lengths)
    assert encoder_forward_flops(model.config, lengths) == expected  # exact (the issue asks within 2%)
    batched = measured_flops(model, [20], batch=4)  # DeBERTa: relative embeddings projected once per call
    assert encoder_forward_flops(model.config, [20] * 4, batches=1) == batched


@pytest.mark.parametrize("case", [case for case in CASES if tiny_family_model(case)._supports_sdpa])
def test_flop_counter_does_not_see_cpu_sdpa_attention(case):
    """With SDPA on CPU the counter misses exactly the attention products, 4n²d per layer:
    the model still computes them, so the FLOPs model keeps them."""
    model = tiny_family_model(case)
    model.set_attn_implementation("sdpa")
    lengths = [5, 17, 30]
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    attention = sum(4 * n * n * d * layers for n in lengths)
    assert measured_flops(model, lengths) + attention == encoder_forward_flops(model.config, lengths)


@pytest.mark.parametrize("case", [case for case in CASES if FAMILIES[FAMILY_CASES[case][0]].packs])
def test_a_packed_pass_counts_the_flops_it_runs(engines, case, monkeypatch):
    """Packed, the matrices run on the real tokens only (the last layer's query, output and
    feed-forward on [CLS] alone) and attention at the padded length: the counter sees the first
    (attention all in CPU SDPA, which hides it from the counter), the model adds the second."""
    monkeypatch.setattr(packing, "SMALL_SCORES", 0)
    engine = engines[case]
    ids, mask, types = engine.tokenize(TEXTS)
    counter = FlopCounterMode(display=False)
    with counter:
        answer = engine.run(TeacherQuery(ids, mask, types, want_logits=True))
    batch, length = ids.shape
    layers, d = engine.info.num_layers, engine.info.hidden_size
    attention = batch * 4 * length * d * ((layers - 1) * length + 1)  # the last layer: [CLS] queries only
    assert counter.get_total_flops() + attention == answer.teacher_flops
    assert answer.padded_tokens == answer.tokens < batch * length
    assert answer.teacher_flops < encoder_forward_flops(engine.config, [length] * batch)


@pytest.mark.parametrize("case", CASES)
def test_first_m_layers_make_a_student(tmp_path, case):
    """The paper's student: the first m layers of a pretrained encoder, the head replaced."""
    path = save_tiny_family(case, tmp_path / case)
    teacher = load_sequence_classifier(path)
    student = load_sequence_classifier(path, num_layers=2, label_names=["no", "yes"])
    family = family_of(student.config)
    assert len(family.layers(student)) == 2 and student.config.num_labels == 2
    for kept, original in zip(family.layers(student), family.layers(teacher)[:2], strict=True):
        for (name, value), (_, reference) in zip(
            kept.state_dict().items(), original.state_dict().items(), strict=True
        ):
            assert torch.equal(value, reference), name
    ids = torch.randint(5, student.config.vocab_size, (2, 12))
    with torch.inference_mode():
        out = student(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert out.logits.shape == (2, 2) and len(out.hidden_states) == 3


def test_unknown_model_type_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"model_type 't5' is not supported; supported families: bert, "):
        family_of(AutoConfig.for_model("t5"))
