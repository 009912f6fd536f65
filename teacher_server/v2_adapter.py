"""KServe v2 ⟷ teacher queries, as pure functions (no I/O, no event loop): the routes run the
large ones in worker threads (tokenizing, rendering and encoding a large request take long) and
the small ones inline (a thread hop costs more than they do).

* :func:`parse` — body → :class:`~shared.codec.DecodedRequest`: input names, datatypes and sizes
  are checked from the JSON header before any tensor is decoded (:func:`check_inputs`).
* :func:`to_call` — decoded request → :class:`TeacherCall`: texts are tokenized with the teacher's
  own tokenizer (:func:`needs_tokenizer`), outputs and parameters checked, the answer's size bounded.
* :func:`encode` — answer → v2 response body (JSON or the binary tensor extension).
* :func:`model_metadata` — the ``GET /v2/models/{name}`` document.

Errors are :class:`~teacher_server.errors.ServiceError` subclasses carrying their status (400
malformed, 422 unanswerable).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from shared.codec import (
    OUTPUT_DATATYPES,
    TORCH_DTYPES,
    CodecError,
    DecodedRequest,
    Tensor,
    build_response_body,
    parse_request_body,
    requested_layers,
    wants_binary,
)
from shared.errors import shown
from shared.protocol import InferenceRequest
from shared.teacher_api import TeacherAnswer, TeacherQuery
from teacher_engine.engine import QueryError, TeacherEngine
from teacher_server.config import TeacherConfig
from teacher_server.errors import BadRequest, Unprocessable

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_INPUTS = ("text", "text_pair")
INPUT_NAMES = TOKEN_INPUTS + TEXT_INPUTS
OUTPUT_NAMES = ("logits", "probs", "hidden_cls", "hidden_states")
OUTPUT_DTYPES = {name: TORCH_DTYPES[name] for name in OUTPUT_DATATYPES}
# Accepted ranges of the numeric request parameters (one home): below MIN_TEMPERATURE, logits / T
# can overflow float32 and softmax returns NaN; a deadline longer than an hour is a client bug.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e4
MAX_TIMEOUT_MS = 3_600_000.0


def parse(
    body: bytes, header_length: str | None, engine: TeacherEngine, config: TeacherConfig
) -> DecodedRequest:
    """A v2 request body, checked and decoded into tensors (texts stay strings)."""
    check = functools.partial(check_inputs, engine=engine, max_rows=config.max_batch_size)
    with _codec_errors_as_400():
        return parse_request_body(body, header_length, check)


@contextlib.contextmanager
def _codec_errors_as_400() -> Iterator[None]:
    """The codec is shared with the client and knows no HTTP statuses."""
    try:
        yield
    except CodecError as err:
        raise BadRequest(err.message, err.field) from None


def needs_tokenizer(request: DecodedRequest) -> bool:
    """Texts are tokenized on the teacher's own preprocessing thread: a fast tokenizer must not be
    used from two threads at once."""
    return "text" in request.inputs


def to_call(request: DecodedRequest, engine: TeacherEngine, config: TeacherConfig) -> TeacherCall:
    """The query a decoded request asks the teacher (see the module docstring)."""
    with _codec_errors_as_400():
        call = to_teacher_call(request, engine)
    megabytes = output_bytes(call, engine) / 2**20
    if megabytes > config.max_output_mb:
        raise Unprocessable(
            f"the outputs would take {megabytes:,.1f} MB, above this teacher's max_output_mb "
            f"{config.max_output_mb:g}: ask for fewer rows, layers or tokens, or FP16/BF16 outputs",
            "outputs",
        )
    return call


def encode(name: str, call: TeacherCall, answer: TeacherAnswer) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and its headers: the requested outputs and the cost parameters."""
    tensors = render_outputs(call, answer)
    return build_response_body(
        name,
        tensors,
        binary_outputs=[n for n in tensors if wants_binary(call.header, n)],
        model_version="1",
        request_id=call.header.id,
        parameters=response_parameters(answer),
    )


@dataclass
class TeacherCall:
    """A v2 request translated: the teacher query and how to render its answer."""

    query: TeacherQuery
    outputs: list[str]
    output_dtype: torch.dtype
    temperature: float
    timeout_s: float | None
    header: InferenceRequest  # the request's JSON header (id, binary_data_output flags)


def check_inputs(header: InferenceRequest, engine: TeacherEngine, max_rows: int) -> None:
    """Names, datatypes and sizes from the JSON header alone (400, 422), before any tensor is
    decoded: a 12 MB ``data`` list under a wrong name or an oversized shape is refused unread."""
    where: dict[str, str] = {}
    for i, entry in enumerate(header.inputs):
        name, location = entry.name, f"inputs[{i}]"
        if name in TOKEN_INPUTS:
            if entry.datatype not in ("INT32", "INT64"):
                raise BadRequest(f"{name} must be INT32 or INT64", f"{location}.datatype")
            if len(entry.shape) != 2:
                raise BadRequest(
                    f"{name} must have shape [batch, length], got {shown(entry.shape)}", f"{location}.shape"
                )
            rows, length = entry.shape
            if length > engine.info.max_seq_length:
                raise QueryError(name, f"length {length} exceeds max_seq_length {engine.info.max_seq_length}")
        elif name in TEXT_INPUTS:
            if entry.datatype != "BYTES":
                raise BadRequest(f"{name} must be BYTES of shape [batch]", f"{location}.datatype")
            rows = math.prod(entry.shape)
        else:
            raise BadRequest(
                f"unknown input {shown(name)}; inputs are {', '.join(INPUT_NAMES)}", f"{location}.name"
            )
        if rows > max_rows:
            raise QueryError(name, f"{rows} rows exceed max_batch_size {max_rows}")
        where[name] = location
    if "text" in where:
        for name in TOKEN_INPUTS:
            if name in where:
                raise BadRequest(f"give either text or {name}, not both", f"{where[name]}.name")
    elif "input_ids" in where:
        if "text_pair" in where:
            raise BadRequest("text_pair goes with text, not input_ids", f"{where['text_pair']}.name")
    else:
        raise BadRequest("send input_ids (INT32/INT64 [B, L]) or text (BYTES [B])", "inputs")


def to_teacher_call(request: DecodedRequest, engine: TeacherEngine) -> TeacherCall:
    """Build the query from inputs that :func:`check_inputs` passed; check outputs and parameters
    (400); the engine checks values (422)."""
    header, inputs = request.header, request.inputs
    if "text" in inputs:
        pairs = _texts(inputs, "text_pair") if "text_pair" in inputs else None
        ids, mask, types = engine.tokenize(_texts(inputs, "text"), pairs)
    else:
        ids = _token_ids(inputs, "input_ids")
        mask = _token_ids(inputs, "attention_mask") if "attention_mask" in inputs else torch.ones_like(ids)
        types = _token_ids(inputs, "token_type_ids") if "token_type_ids" in inputs else None

    requested = [entry.name for entry in header.outputs] if header.outputs else ["logits"]
    for i, name in enumerate(requested):
        if name not in OUTPUT_NAMES:
            raise BadRequest(
                f"unknown output {shown(name)}; outputs are {', '.join(OUTPUT_NAMES)}", f"outputs[{i}].name"
            )
        if requested.index(name) != i:
            raise BadRequest(f"output {shown(name)} asked for twice", f"outputs[{i}].name")
    params = header.parameters or {}
    return TeacherCall(
        query=TeacherQuery(
            ids,
            mask,
            types,
            want_logits="logits" in requested or "probs" in requested,
            cls_layers=_layers(header, "hidden_cls", requested, engine),
            token_layers=_layers(header, "hidden_states", requested, engine),
            use_cache=_parameter(params, "cache", bool, True),
        ),
        outputs=requested,
        output_dtype=_output_dtype(params),
        temperature=_temperature(header),
        timeout_s=_timeout_s(params),
        header=header,
    )


def output_bytes(call: TeacherCall, engine: TeacherEngine) -> int:
    """The size of the answer's tensors, known before it runs: all-token hidden states of many
    layers grow as rows × layers × tokens × width, and the service holds a few copies of an answer
    while it renders it."""
    rows, length = call.query.input_ids.shape
    width, labels = engine.info.hidden_size, engine.info.num_labels
    per_row = sum(labels for name in call.outputs if name in ("logits", "probs"))
    per_row += len(call.query.cls_layers) * width + len(call.query.token_layers) * length * width
    return rows * per_row * call.output_dtype.itemsize


def _texts(inputs: dict[str, Tensor], name: str) -> list[str]:
    value = inputs[name]
    assert isinstance(value, list)  # BYTES: check_inputs made sure
    return value


def _token_ids(inputs: dict[str, Tensor], name: str) -> torch.Tensor:
    value = inputs[name]
    assert isinstance(value, torch.Tensor)  # INT32/INT64 [batch, length]: check_inputs made sure
    return value.long()


def _layers(
    header: InferenceRequest, output: str, requested: list[str], engine: TeacherEngine
) -> tuple[int, ...]:
    """The layers for a hidden-state output: its own parameter, else the request's, else all."""
    if output not in requested:
        return ()
    layers = requested_layers(header, output) or tuple(range(engine.info.num_layers + 1))
    depth = engine.info.num_layers
    bad = sorted({layer for layer in layers if layer > depth})
    repeated = len(set(layers)) != len(layers)
    if bad or repeated:
        index = requested.index(output)
        own = header.outputs and (header.outputs[index].parameters or {}).get("layers") is not None
        location = f"outputs[{index}].parameters.layers" if own else "parameters.layers"
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise Unprocessable(f"layers [{shown}] exceed the teacher's {depth} layers", location)
        raise Unprocessable(
            f"layers repeat: give each of the {depth + 1} layers (0..{depth}) at most once", location
        )
    return layers


T = TypeVar("T")


def _parameter(
    params: dict[str, Any], name: str, kind: type[T], default: T, location: str = "parameters"
) -> T:
    value = params.get(name, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{name} must be a {kind.__name__}", f"{location}.{name}")
    return value


def _output_dtype(params: dict[str, Any]) -> torch.dtype:
    name = _parameter(params, "output_dtype", str, "FP32").upper()
    if name not in OUTPUT_DTYPES:
        raise BadRequest(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}", "parameters.output_dtype")
    return OUTPUT_DTYPES[name]


def _temperature(header: InferenceRequest) -> float:
    """``temperature`` for ``probs``: on that output's parameters, else on the request's."""
    for i, entry in enumerate(header.outputs or ()):
        if entry.name == "probs" and entry.parameters and "temperature" in entry.parameters:
            return _number(
                entry.parameters["temperature"],
                f"outputs[{i}].parameters.temperature",
                MIN_TEMPERATURE,
                MAX_TEMPERATURE,
            )
    params = header.parameters or {}
    if "temperature" not in params:
        return 1.0
    return _number(params["temperature"], "parameters.temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)


def _timeout_s(params: dict[str, Any]) -> float | None:
    """The request's deadline: our ``timeout_ms``, or Triton's ``timeout`` (microseconds)."""
    if "timeout_ms" in params:
        return _number(params["timeout_ms"], "parameters.timeout_ms", 0.0, MAX_TIMEOUT_MS) / 1e3
    if "timeout" in params:
        return _number(params["timeout"], "parameters.timeout", 0.0, MAX_TIMEOUT_MS * 1e3) / 1e6
    return None


def _number(value: Any, location: str, low: float, high: float) -> float:
    """A number in (``low``, ``high``] when ``low`` is 0, else in [``low``, ``high``] (400 naming
    ``location``); compared before any float conversion, so 10**400 is refused, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # NaN
        raise BadRequest("must be a number", location)
    if not (low < value if low == 0 else low <= value) or not value <= high:
        lower = f"> {low:g}" if low == 0 else f">= {low:g}"
        raise BadRequest(f"must be a number {lower} and <= {high:g}", location)
    return float(value)


def render_outputs(call: TeacherCall, answer: TeacherAnswer) -> dict[str, Tensor]:
    """The requested outputs, in request order, in the requested dtype."""
    tensors = {
        "logits": lambda: answer.logits,
        "probs": lambda: torch.softmax(answer.logits.float() / call.temperature, dim=-1),
        "hidden_cls": lambda: answer.hidden_cls,
        "hidden_states": lambda: answer.hidden_states,
    }
    return {name: tensors[name]().to(call.output_dtype) for name in call.outputs}


def response_parameters(answer: TeacherAnswer) -> dict[str, int]:
    return {
        "teacher_flops": answer.teacher_flops,
        "tokens": answer.tokens,
        "padded_tokens": answer.padded_tokens,
        "queue_us": int(answer.timings.queue_us),
        "compute_us": int(answer.timings.compute_us),
        "cache_hits": answer.cache_hits,
    }


def model_metadata(name: str, engine: TeacherEngine) -> dict[str, Any]:
    """The v2 model metadata, plus ``parameters`` the trainer needs (layers, sizes, labels, FLOPs)."""
    info = engine.info
    tokens = [-1, -1]
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch_transformers",
        "inputs": [
            *(
                {"name": n, "datatype": "INT64", "shape": tokens}
                for n in ("input_ids", "attention_mask", "token_type_ids")
            ),
            *({"name": n, "datatype": "BYTES", "shape": [-1]} for n in ("text", "text_pair")),
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, info.num_labels]},
            {"name": "probs", "datatype": "FP32", "shape": [-1, info.num_labels]},
            {"name": "hidden_cls", "datatype": "FP32", "shape": [-1, -1, info.hidden_size]},
            {"name": "hidden_states", "datatype": "FP32", "shape": [-1, -1, -1, info.hidden_size]},
        ],
        "parameters": {
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "num_labels": info.num_labels,
            "labels": list(info.label_names),
            "vocab_size": info.vocab_size,
            "max_seq_length": info.max_seq_length,
            "revision": engine.revision,
            "flops_per_token": engine.flops_per_token,
            "intermediate_size": info.intermediate_size,
            **info.metadata_parameters(),
        },
    }
