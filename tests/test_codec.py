"""The v2 wire codec: round trips, interop with an unmodified tritonclient, and field-named errors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.codec import (
    HEADER_LENGTH,
    OUTPUT_DATATYPES,
    TORCH_DTYPES,
    CodecError,
    build_request_body,
    build_response_body,
    parse_layers,
    parse_request_body,
    parse_response_body,
    requested_layers,
    wants_binary,
)
from shared.protocol import InferenceRequest, ModelMetadata

BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same(got, want) -> None:
    """Bit-exact equality (NaN-safe), same dtype and shape; lists of str compare as lists."""
    if isinstance(want, list):
        assert got == want
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.is_floating_point:
        got, want = got.view(BITS[want.element_size()]), want.view(BITS[want.element_size()])
    assert torch.equal(got, want)


def header_length(headers: dict[str, str]) -> int | None:
    return int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None


SAMPLES = {
    "FP32": torch.tensor([[0.1, -2.5, 3.0e-8], [1e30, -0.0, 7.25]], dtype=torch.float32),
    "INT64": torch.tensor([[101, 2023, 2**40], [-(2**62), 0, 102]], dtype=torch.int64),
    "INT32": torch.tensor([[101, 7, 102], [101, 0, 0]], dtype=torch.int32),
    "FP16": torch.tensor([[0.5, -1.25, 65504.0], [1e-4, 3.0, -7.0]], dtype=torch.float16),
    "BF16": torch.tensor([[0.5, -1.25, 3e38], [1e-20, 3.0, -7.0]], dtype=torch.bfloat16),
}


def to_numpy(value: torch.Tensor) -> np.ndarray:
    if value.dtype == torch.bfloat16:
        return value.float().numpy().astype(ml_dtypes.bfloat16)
    return value.numpy()


# --- interop with tritonclient ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "binary"),
    # tritonclient sends BF16 only in binary (JSON has no bfloat16 representation)
    [(d, b) for d in [*SAMPLES, "BYTES"] for b in (True, False) if (d, b) != ("BF16", False)],
)
def test_parses_requests_built_by_tritonclient(datatype: str, binary: bool) -> None:
    if datatype == "BYTES":
        want: torch.Tensor | list[str] = ["a good movie", "naïve — ünïcode", ""]
        array = np.array(want, dtype=np.object_)
        shape = [3]
    else:
        want = SAMPLES[datatype]
        array, shape = to_numpy(want), list(want.shape)
    tensor = triton.InferInput("x", shape, datatype).set_data_from_numpy(array, binary_data=binary)
    mask = triton.InferInput("attention_mask", [2, 2], "INT32")
    mask.set_data_from_numpy(np.ones((2, 2), dtype=np.int32), binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("logits"),
        triton.InferRequestedOutput("hidden_cls", binary_data=False),
    ]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [tensor, mask], outputs, request_id="r1", parameters={"layers": "0,2", "temperature": 2.0}
    )

    decoded = parse_request_body(body, json_size)

    assert list(decoded.inputs) == ["x", "attention_mask"]
    assert_same(decoded.inputs["x"], want)
    assert_same(decoded.inputs["attention_mask"], torch.ones(2, 2, dtype=torch.int32))
    assert decoded.header.id == "r1" and decoded.header.parameters["temperature"] == 2.0
    assert requested_layers(decoded.header, "hidden_cls") == (0, 2)
    assert wants_binary(decoded.header, "logits") and not wants_binary(decoded.header, "hidden_cls")


def test_tritonclient_without_outputs_asks_for_all_in_binary() -> None:
    ids = triton.InferInput("input_ids", [1, 2], "INT64").set_data_from_numpy(np.array([[1, 2]]))
    body, json_size = triton.InferenceServerClient.generate_request_body([ids])
    header = parse_request_body(body, json_size).header
    assert header.outputs is None and wants_binary(header, "logits")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*SAMPLES, "BYTES"])
def test_tritonclient_parses_our_responses(datatype: str, binary: bool) -> None:
    value: torch.Tensor | list[str] = ["négatif", "positive"] if datatype == "BYTES" else SAMPLES[datatype]
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    body, headers = build_response_body(
        "small",
        {"x": value, "logits": logits},
        binary_outputs={"x", "logits"} if binary else (),
        request_id="r7",
        parameters={"teacher_flops": 12345, "tokens": 6},
    )

    result = triton.InferResult.from_response_body(body, header_length=header_length(headers))

    got = result.as_numpy("x")
    if datatype == "BYTES":
        assert [v.decode() if isinstance(v, bytes) else v for v in got.tolist()] == value
    else:
        assert got.shape == tuple(value.shape)
        np.testing.assert_array_equal(got.astype(np.float64), value.double().numpy())
    np.testing.assert_array_equal(result.as_numpy("logits"), logits.numpy())
    response = result.get_response()
    assert response["id"] == "r7" and response["parameters"] == {"teacher_flops": 12345, "tokens": 6}
    assert (HEADER_LENGTH in headers) == binary


# --- our own round trips ------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, *, json_safe: bool) -> torch.Tensor | list[str]:
    datatype = draw(st.sampled_from([*TORCH_DTYPES, "BYTES"]))
    if datatype == "BYTES":
        return draw(st.lists(st.text(max_size=6), max_size=5))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BOOL":
        return torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    if datatype == "BF16":
        floats = hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=not json_safe))
        return torch.from_numpy(draw(floats)).to(torch.bfloat16)
    dtype = torch.empty(0, dtype=TORCH_DTYPES[datatype]).numpy().dtype
    elements = st.floats(width=dtype.itemsize * 8, allow_nan=not json_safe) if dtype.kind == "f" else None
    return torch.from_numpy(draw(hnp.arrays(dtype, shape, elements=elements)))


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "text"]), tensors(json_safe=False), min_size=1, max_size=3
    ),
    st.booleans(),
)
def test_request_round_trip_binary(inputs: dict, binary_outputs: bool) -> None:
    body, headers = build_request_body(
        inputs, outputs={"hidden_cls": {"layers": [0, 3]}}, binary_outputs=binary_outputs
    )
    decoded = parse_request_body(body, header_length(headers))
    assert list(decoded.inputs) == list(inputs)
    for name, value in inputs.items():
        assert_same(decoded.inputs[name], value)
    assert requested_layers(decoded.header, "hidden_cls") == (0, 3)
    assert wants_binary(decoded.header, "hidden_cls") == binary_outputs


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["logits", "probs", "x"]), tensors(json_safe=True), max_size=3), st.data()
)
def test_response_round_trip_mixed_json_and_binary(outputs: dict, data: st.DataObject) -> None:
    binary = data.draw(st.sets(st.sampled_from(sorted(outputs)))) if outputs else set()
    body, headers = build_response_body("m", outputs, binary_outputs=binary, model_version="3")
    decoded = parse_response_body(body, header_length(headers))
    assert decoded.header.model_version == "3"
    for name, value in outputs.items():
        assert_same(decoded.outputs[name], value)


@pytest.mark.parametrize("data", [[[1, 2], [3, 4]], [1, 2, 3, 4]], ids=["nested", "flat"])
def test_json_data_may_be_nested_as_the_shape_or_flat(data: list) -> None:
    body = json.dumps({"inputs": [{"name": "input_ids", "shape": [2, 2], "datatype": "INT32", "data": data}]})
    assert_same(
        parse_request_body(body.encode(), None).inputs["input_ids"], torch.tensor([[1, 2], [3, 4]]).int()
    )


def test_a_json_body_may_give_its_own_length_in_the_header() -> None:
    body = request(IDS)
    assert parse_request_body(body, len(body)).inputs["input_ids"].tolist() == [[1, 2]]


def test_json_request_has_no_header_length() -> None:
    body, headers = build_request_body(
        {"input_ids": torch.ones(1, 3, dtype=torch.int64)}, binary_inputs=False
    )
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body)["inputs"][0]["data"] == [1, 1, 1]


# --- errors name the field ---------------------------------------------------------------------------


def request(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


IDS = {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}


@pytest.mark.parametrize(
    ("body", "length", "field", "words"),
    [
        (b"{not json", None, "body", "JSON"),
        (request(IDS), "x", HEADER_LENGTH, "integer"),
        (request(IDS), 10_000, HEADER_LENGTH, "outside"),
        (request(IDS), 1, HEADER_LENGTH, "the first 1 bytes, as this header says, are not the JSON part"),
        (request(), None, "inputs", "at least 1"),
        (request(IDS, output=[]), None, "output", "Extra"),
        (request(IDS, {**IDS, "name": "mask", "datatype": "INT33"}), None, "inputs[1].datatype", "INT64"),
        (request(IDS, {**IDS, "name": "mask", "shape": [1, -2]}), None, "inputs[1].shape[1]", "greater"),
        (
            request(IDS, {**IDS, "name": "mask", "data": [1, 2, 3]}),
            None,
            "inputs[1].data",
            "3 values given but shape [1, 2] holds 2",
        ),
        # nested data must match the shape: never flattened into some other tensor
        (
            request(IDS, {**IDS, "name": "mask", "data": [[1], []]}),
            None,
            "inputs[1].data",
            "data has 2 entries",
        ),
        (
            request({**IDS, "shape": [2, 2], "data": [[2, 10, 3], [4]]}),
            None,
            "inputs[0].data",
            "data[0] has 3 entries, not 2",
        ),
        (request({**IDS, "data": [[[1], [2]]]}), None, "inputs[0].data", "data[0][0] is a list, not a value"),
        (request({**IDS, "shape": [2, 1], "data": [[1], 2]}), None, "inputs[0].data", "data[1] is a value"),
        (request({**IDS, "shape": [], "data": [[1]]}), None, "inputs[0].data", "shape []"),
        (request({**IDS, "data": [1, 2.5]}), None, "inputs[0].data", "integers"),
        (request({**IDS, "data": [1, True]}), None, "inputs[0].data", "integers"),
        (request({**IDS, "datatype": "INT8", "data": [1, 300]}), None, "inputs[0].data", "[-128, 127]"),
        (request({**IDS, "datatype": "FP32", "data": [1, "a"]}), None, "inputs[0].data", "numbers"),
        (request({**IDS, "datatype": "FP32", "data": [1, 10**400]}), None, "inputs[0].data", "float64 range"),
        (
            request({**IDS, "datatype": "FP64", "data": [-(10**309), 1]}),
            None,
            "inputs[0].data",
            "float64 range",
        ),
        (request({**IDS, "datatype": "BYTES", "data": [1, 2]}), None, "inputs[0].data", "strings"),
        (request({**IDS, "data": None}), None, "inputs[0].data", "no tensor data"),
        (request(IDS, IDS), None, "inputs[1].name", "twice"),
        (
            request({**IDS, "parameters": {"layers": {"a": 1}}}),
            None,
            "inputs[0].parameters.layers",
            "parameter",
        ),
        (
            request({**IDS, "parameters": {"shared_memory_region": "r"}}),
            None,
            "inputs[0].parameters.shared_memory_region",
            "not supported",
        ),
    ],
)
def test_bad_json_requests_name_the_field(body: bytes, length: object, field: str, words: str) -> None:
    with pytest.raises(CodecError) as err:
        parse_request_body(body, length)
    assert err.value.field == field
    assert words in err.value.message


def test_a_huge_list_under_a_small_shape_is_refused_unwalked() -> None:
    data = [7] * 2_000_000
    with pytest.raises(CodecError) as err:
        parse_request_body(request({**IDS, "data": data}), None)
    assert err.value.field == "inputs[0].data" and "2000000 values given" in err.value.message


def test_check_header_runs_before_any_tensor_is_decoded() -> None:
    seen: list[str] = []

    def refuse(header: InferenceRequest) -> None:
        seen.extend(entry.name for entry in header.inputs)
        raise CodecError("not served here", "inputs[1].name")

    body = request(IDS, {**IDS, "name": "pixels", "data": [1, 2, 3]})  # its data would fail to decode
    with pytest.raises(CodecError) as err:
        parse_request_body(body, None, refuse)
    assert err.value.field == "inputs[1].name" and seen == ["input_ids", "pixels"]
    assert_same(
        parse_request_body(request(IDS), None, seen.append).inputs["input_ids"], torch.tensor([[1, 2]])
    )


def binary_request(size_param: object, blob: bytes, datatype: str = "INT64", shape: list[int] | None = None):
    header = request({"name": "input_ids", "shape": shape or [1, 2], "datatype": datatype,
                      "parameters": {"binary_data_size": size_param}})  # fmt: skip
    return header + blob, len(header)


@pytest.mark.parametrize(
    ("size", "blob", "datatype", "field", "words"),
    [
        (16, b"\0" * 12, "INT64", "inputs[0].parameters.binary_data_size", "only 12 bytes"),
        (12, b"\0" * 12, "INT64", "inputs[0].parameters.binary_data_size", "needs 16"),
        (16, b"\0" * 20, "INT64", "body", "4 bytes of binary data follow"),
        (-1, b"", "INT64", "inputs[0].parameters.binary_data_size", "non-negative"),
        ("16", b"\0" * 16, "INT64", "inputs[0].parameters.binary_data_size", "non-negative"),
        (2, b"\x01\x02", "BOOL", "inputs[0].parameters.binary_data_size", "0 or 1"),
        (6, b"\x02\0\0\0ab", "BYTES", "inputs[0].parameters.binary_data_size", "ends before element 1"),
        (8, b"\x02\0\0\0ab\0\0", "BYTES", "inputs[0].parameters.binary_data_size", "ends before element 1"),
        (6, b"\x09\0\0\0ab", "BYTES", "inputs[0].parameters.binary_data_size", "runs past"),
        (12, b"\x02\0\0\0\xff\xfe\x00\0\0\0\0\0", "BYTES", "inputs[0].parameters.binary_data_size", "UTF-8"),
    ],
)
def test_bad_binary_requests_name_the_field(size, blob, datatype, field, words) -> None:
    body, length = binary_request(size, blob, datatype, [2] if datatype == "BYTES" else None)
    with pytest.raises(CodecError) as err:
        parse_request_body(body, length)
    assert err.value.field == field
    assert words in err.value.message


def test_data_and_binary_together_is_an_error() -> None:
    header = request({**IDS, "parameters": {"binary_data_size": 16}})
    with pytest.raises(CodecError) as err:
        parse_request_body(header + b"\0" * 16, len(header))
    assert err.value.field == "inputs[0].data"


def test_response_errors_name_output_fields() -> None:
    body = json.dumps(
        {
            "model_name": "m",
            "outputs": [{"name": "logits", "shape": [2, 2], "datatype": "FP32", "data": [1.0]}],
        }
    ).encode()
    with pytest.raises(CodecError) as err:
        parse_response_body(body, None)
    assert err.value.field == "outputs[0].data"


# --- layers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"), [("0,6,12", (0, 6, 12)), (" 1 , 2 ", (1, 2)), ([3, 0], (3, 0)), (4, (4,)), ("7", (7,))]
)
def test_parse_layers(value: object, want: tuple[int, ...]) -> None:
    assert parse_layers(value, field="parameters.layers") == want


@pytest.mark.parametrize(
    "value",
    ["", "1,,2", "a", "-1", "1.5", [], [1, -2], True, 2.0, "²", "1,²", "٣", "１"],  # ASCII digits only
)
def test_parse_layers_rejects(value: object) -> None:
    with pytest.raises(CodecError) as err:
        parse_layers(value, field="outputs[0].parameters.layers")
    assert err.value.field == "outputs[0].parameters.layers"


def test_output_layers_override_request_layers_and_errors_point_at_the_source() -> None:
    def header(**body: object) -> InferenceRequest:
        return InferenceRequest.model_validate({"inputs": [IDS], **body})

    both = header(
        parameters={"layers": "1"},
        outputs=[{"name": "logits"}, {"name": "hidden_cls", "parameters": {"layers": [2, 3]}}],
    )
    assert requested_layers(both, "hidden_cls") == (2, 3)
    assert requested_layers(both, "hidden_states") == (1,)
    assert requested_layers(header(), "hidden_cls") is None
    with pytest.raises(CodecError) as err:
        requested_layers(
            header(outputs=[{"name": "a"}, {"name": "hidden_cls", "parameters": {"layers": "x"}}]),
            "hidden_cls",
        )
    assert err.value.field == "outputs[1].parameters.layers"
    with pytest.raises(CodecError) as err:
        requested_layers(header(parameters={"layers": "x"}), "hidden_cls")
    assert err.value.field == "parameters.layers"


def test_binary_output_default_and_override() -> None:
    header = InferenceRequest.model_validate(
        {"inputs": [IDS], "parameters": {"binary_data_output": True},
         "outputs": [{"name": "logits"}, {"name": "probs", "parameters": {"binary_data": False}}]}
    )  # fmt: skip
    assert wants_binary(header, "logits") and not wants_binary(header, "probs")
    assert not wants_binary(InferenceRequest.model_validate({"inputs": [IDS]}), "logits")


def test_model_metadata_gives_teacher_info() -> None:
    meta = ModelMetadata.model_validate(
        {"name": "small", "versions": ["1"], "platform": "pytorch_transformers",
         "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}],
         "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
         "parameters": {"num_layers": 2, "hidden_size": 32, "num_labels": 2, "labels": ["neg", "pos"],
                        "vocab_size": 99, "max_seq_length": 128, "revision": "abc", "flops_per_token": 1.5e6}}
    )  # fmt: skip
    info = meta.teacher_info()
    assert (info.name, info.num_layers, info.hidden_size, info.label_names) == (
        "small",
        2,
        32,
        ("neg", "pos"),
    )
    assert (info.vocab_size, info.max_seq_length) == (99, 128)


@pytest.mark.parametrize("datatype", OUTPUT_DATATYPES)
def test_json_response_keeps_non_finite_values(datatype: str) -> None:
    """The fast JSON writer would turn NaN and infinity into null; such bodies take the slow path."""
    value = torch.tensor([1.5, float("nan"), float("inf"), -float("inf"), -0.0]).to(TORCH_DTYPES[datatype])
    body, headers = build_response_body("m", {"logits": value}, binary_outputs=[], model_version="1")
    assert b"null" not in body
    got = parse_response_body(body, header_length(headers)).outputs["logits"]
    assert got.dtype == value.dtype
    torch.testing.assert_close(got, value, equal_nan=True, rtol=0, atol=0)
    assert torch.signbit(got[-1])


def test_json_float32_is_written_shortest_and_reads_back_exactly() -> None:
    value = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    body, headers = build_response_body("m", {"logits": value}, binary_outputs=[], model_version="1")
    assert_same(parse_response_body(body, header_length(headers)).outputs["logits"], value)
    assert len(body) < 12 * value.numel()  # float64 reprs of float32 values take ~20 bytes each
