"""The teacher engine and the in-process client: same numbers as transformers, early exit, FLOPs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shared.flops import encoder_forward_flops
from shared.teacher_api import TeacherQuery
from student_trainer.teachers.client import make_teacher_client
from student_trainer.teachers.local import LocalTeacherClient
from teacher_engine.engine import MAX_CHARS_PER_TOKEN, QueryError, TeacherEngine
from tests.tiny_models import layer_probe, tiny_vocab

TEXTS = ["a good movie", "the plot was boring and the acting awful , really bad", "fun !"]
PAIRS = ["i like it", "not great", "the best film of the year"]


@pytest.fixture(scope="module")
def engines(tiny_teachers) -> dict[str, TeacherEngine]:
    return {name: TeacherEngine.load(name, path) for name, path in tiny_teachers.items()}


def reference(engine: TeacherEngine, ids, mask, types):
    """What plain transformers computes: logits and every hidden state."""
    with torch.inference_mode():
        out = engine.model(
            input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
        )
    return out.logits, out.hidden_states


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("teacher", ["small", "large"])
@pytest.mark.parametrize(
    ("want_logits", "cls_layers", "token_layers"),
    [(True, (), ()), (False, (0,), ()), (False, (1, 2), (2,)), (True, (0, 2, 1), (0, 1))],
)
def test_outputs_equal_transformers(
    engines, monkeypatch, packs, teacher, want_logits, cls_layers, token_layers
):
    engine = engines[teacher]
    monkeypatch.setattr(engine, "packs", packs)
    ids, mask, types = engine.tokenize(TEXTS, PAIRS)
    answer = engine.run(TeacherQuery(ids, mask, types, want_logits, cls_layers, token_layers))
    logits, hidden = reference(engine, ids, mask, types)
    if want_logits:
        torch.testing.assert_close(answer.logits, logits, atol=1e-5, rtol=0)
    else:
        assert answer.logits is None
    if cls_layers:
        assert answer.hidden_cls.shape == (3, len(cls_layers), engine.info.hidden_size)
        for j, layer in enumerate(cls_layers):
            torch.testing.assert_close(answer.hidden_cls[:, j], hidden[layer][:, 0], atol=1e-5, rtol=0)
    else:
        assert answer.hidden_cls is None
    if token_layers:
        assert answer.hidden_states.shape == (3, len(token_layers), ids.shape[1], engine.info.hidden_size)
        for j, layer in enumerate(token_layers):
            real = mask.bool()
            torch.testing.assert_close(
                answer.hidden_states[:, j][real], hidden[layer][real], atol=1e-5, rtol=0
            )
            assert answer.hidden_states[:, j][~real].abs().sum() == 0  # padding is zeroed, not garbage
    assert answer.tokens == int(mask.sum())
    assert answer.padded_tokens == (answer.tokens if packs else ids.numel())  # what the matrices ran on
    for tensor in (answer.logits, answer.hidden_cls, answer.hidden_states):
        assert tensor is None or (tensor.dtype == torch.float32 and tensor.device.type == "cpu")


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "padded"])
def test_early_exit_runs_only_the_layers_needed(engines, monkeypatch, packs):
    engine = engines["large"]  # 4 layers
    monkeypatch.setattr(engine, "packs", packs)
    calls = []
    hooks = [
        layer_probe(engine, layer).register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, layer in enumerate(engine.model.bert.encoder.layer, start=1)
    ]
    hooks.append(engine.model.bert.pooler.register_forward_hook(lambda m, i, o: calls.append("pooler")))
    try:
        ids, mask, types = engine.tokenize(TEXTS)
        answer = engine.run(TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(0, 2)))
        assert calls == [1, 2]
        batch, length = ids.shape
        ran = mask.sum(dim=1).tolist() if packs else [length] * batch  # packed: real tokens only
        assert answer.teacher_flops == encoder_forward_flops(
            engine.config, ran, 2, with_head=False, attention_len=length, first_token_last=packs
        )
        calls.clear()
        answer = engine.run(TeacherQuery(ids, mask, types, want_logits=False, cls_layers=(0,)))
        assert calls == [] and answer.teacher_flops == 0
        answer = engine.run(TeacherQuery(ids, mask, types, want_logits=True))
        assert calls == [1, 2, 3, 4, "pooler"]
        assert answer.teacher_flops == encoder_forward_flops(
            engine.config, ran, attention_len=length, first_token_last=packs
        )
    finally:
        for hook in hooks:
            hook.remove()


def query_with(engine, **changes) -> TeacherQuery:
    """The tokenized TEXTS ([3, 13]) with some fields replaced; new ``input_ids`` come unpadded."""
    ids, mask, types = engine.tokenize(TEXTS)
    if "input_ids" in changes:
        ids = changes["input_ids"]
        mask, types = torch.ones(ids.shape, dtype=torch.long), None
    fields = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "want_logits": True}
    return TeacherQuery(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"input_ids": torch.full((2, 5), 10_000)}, "input_ids"),
        ({"input_ids": torch.full((2, 5), -1)}, "input_ids"),
        ({"input_ids": torch.ones(2, 5)}, "input_ids"),  # float ids
        ({"input_ids": torch.ones(5, dtype=torch.long)}, "input_ids"),  # 1-D
        ({"input_ids": torch.ones(1, 129, dtype=torch.long)}, "input_ids"),  # > max_seq_length 128
        ({"attention_mask": torch.ones(3, 2, dtype=torch.long)}, "attention_mask"),
        ({"attention_mask": torch.full((3, 13), 2)}, "attention_mask"),
        ({"attention_mask": torch.tensor([[0] + [1] * 12] * 3)}, "attention_mask"),  # left padding
        ({"token_type_ids": torch.full((3, 13), 5)}, "token_type_ids"),
        ({"token_type_ids": torch.zeros(3, 3, dtype=torch.long)}, "token_type_ids"),
        ({"cls_layers": (0, 3)}, "cls_layers"),  # small teacher has 2 layers
        ({"token_layers": (-1,)}, "token_layers"),
        ({"want_logits": False}, "outputs"),
    ],
)
def test_invalid_queries_name_the_field(engines, changes, field):
    engine = engines["small"]
    assert query_with(engine).input_ids.shape == (3, 13)  # the shape the cases above are written for
    with pytest.raises(QueryError) as err:
        engine.run(query_with(engine, **changes))
    assert err.value.field == field and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("mask", "says"),
    [
        ([[1, 1, 2, 0]], "values must be 0 or 1"),
        ([[1, 0, 1, 0]], "1s then 0s"),  # a hole
        ([[0, 0, 0, 0]], "1s then 0s"),  # an empty row
    ],
)
def test_a_bad_mask_is_told_what_is_wrong(engines, mask, says):
    engine = engines["small"]
    ids = torch.tensor([[2, 10, 11, 3]])
    with pytest.raises(QueryError, match=says):
        engine.run(TeacherQuery(ids, torch.tensor(mask), None))


def test_masks_of_any_integer_or_bool_dtype_are_accepted(engines):
    engine = engines["small"]
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = engine.run(TeacherQuery(ids, mask, None)).logits
    for dtype in (torch.bool, torch.int32, torch.uint8):
        torch.testing.assert_close(engine.run(TeacherQuery(ids, mask.to(dtype), None)).logits, expected)


def test_tokenize_truncates_and_checks_pairs(tiny_teachers):
    engine = TeacherEngine.load("small", tiny_teachers["small"], max_seq_length=8)
    ids, mask, types = engine.tokenize(["one two three four five six seven eight nine ten"], ["a b c"])
    assert ids.shape == (1, 8) and mask.all() and types.max() == 1
    with pytest.raises(QueryError) as err:
        engine.tokenize(["a", "b"], ["c"])
    assert err.value.field == "text_pair"


def test_huge_texts_are_cut_before_tokenizing_without_changing_the_tokens(engines, monkeypatch):
    engine = engines["small"]  # max_seq_length 128: texts are cut to 128 × 64 characters
    huge, prefix = "good movie " * 300_000, "good movie " * 100  # 3.3 MB; 200 tokens > 128
    seen: list[int] = []
    tokenizer = engine.batch_tokenizer

    def recording(texts, pairs=None):
        seen.extend(len(t) for t in [*texts, *(pairs or [])])
        return tokenizer(texts, pairs)

    monkeypatch.setattr(engine, "batch_tokenizer", recording)
    for texts, pairs, same_texts, same_pairs in (
        ([huge, "fun !"], None, [prefix, "fun !"], None),
        (["fun !", "a good movie"], [huge, "i like it"], ["fun !", "a good movie"], [prefix, "i like it"]),
    ):
        got = engine.tokenize(texts, pairs)
        want = engine.tokenize(same_texts, same_pairs)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert max(seen) <= 128 * MAX_CHARS_PER_TOKEN


def test_info_describes_the_teacher(engines):
    info = engines["large"].info
    assert (info.name, info.num_layers, info.hidden_size, info.num_labels) == ("large", 4, 48, 2)
    assert info.label_names == ("negative", "positive")
    assert info.vocab_size == len(tiny_vocab())
    assert info.max_seq_length == 128  # min(512 asked, 128 position embeddings)


def test_bf16_teacher_returns_float32_close_to_fp32(tiny_teachers, engines):
    engine = TeacherEngine.load("small", tiny_teachers["small"], dtype="bf16")
    assert engine.dtype == torch.bfloat16
    query = query_with(engine, cls_layers=(2,))
    answer = engine.run(query)
    exact = engines["small"].run(query)
    assert answer.logits.dtype == torch.float32
    torch.testing.assert_close(answer.logits, exact.logits, atol=0.1, rtol=0.05)
    torch.testing.assert_close(answer.hidden_cls, exact.hidden_cls, atol=0.1, rtol=0.05)


def test_local_client_answers_like_the_engine(tiny_teachers, engines):
    client = make_teacher_client(f"local:{tiny_teachers['large']}", name="large", timeout_s=3, api_key="x")
    assert isinstance(client, LocalTeacherClient)
    query = query_with(engines["large"], cls_layers=(0, 4))

    async def scenario():
        with pytest.raises(RuntimeError):
            await client.infer(query)
        info = await client.start(ready_timeout_s=60)
        answers = await asyncio.gather(client.infer(query), client.infer(query))
        await client.aclose()
        return info, answers

    info, answers = asyncio.run(scenario())
    assert info == engines["large"].info and client.info == info
    expected = engines["large"].run(query)
    for answer in answers:
        torch.testing.assert_close(answer.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(answer.hidden_cls, expected.hidden_cls, atol=1e-5, rtol=0)
        assert answer.teacher_flops == expected.teacher_flops > 0


@pytest.mark.parametrize("teacher", ["small", "large"])
def test_batch_invariant_rows_do_not_depend_on_their_neighbours(tiny_teachers, teacher):
    """A row answers bit-identically alone and among others of any length; FLOPs count real tokens."""
    engine = TeacherEngine.load(teacher, tiny_teachers[teacher], batch_invariant=True)
    ids, mask, types = engine.tokenize(TEXTS, PAIRS)
    query = TeacherQuery(ids, mask, types, want_logits=True, cls_layers=(0, 1), token_layers=(1,))
    together = engine.run(query)
    lengths = mask.sum(dim=1).tolist()
    for i, length in enumerate(lengths):
        alone = engine.run(
            TeacherQuery(
                ids[i : i + 1, :length],
                mask[i : i + 1, :length],
                types[i : i + 1, :length],
                want_logits=True,
                cls_layers=(0, 1),
                token_layers=(1,),
            )
        )
        assert torch.equal(together.logits[i], alone.logits[0])
        assert torch.equal(together.hidden_cls[i], alone.hidden_cls[0])
        assert torch.equal(together.hidden_states[i, :, :length], alone.hidden_states[0])
        assert not together.hidden_states[i, :, length:].any()  # padding stays exact zeros
    assert together.padded_tokens == together.tokens == sum(lengths)
    layers = engine.info.num_layers  # each row runs alone: only its [CLS] in the last layer, packed
    assert together.teacher_flops == encoder_forward_flops(
        engine.config, lengths, layers, first_token_last=engine.packs
    )
    reference_logits, _ = reference(engine, ids, mask, types)
    torch.testing.assert_close(together.logits, reference_logits, atol=1e-5, rtol=0)
