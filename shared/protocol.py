"""The KServe Open Inference Protocol v2 JSON documents, as pydantic models.

These are the JSON part of the wire only: tensor contents (the JSON ``data`` lists or the
binary blobs after the JSON header) are decoded by :mod:`shared.codec`. Requests are strict
(unknown keys are errors, so a typo such as ``output`` is reported, not ignored); responses
are lenient so a client keeps working against a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from shared.teacher_api import TeacherInfo

Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BYTES"
]


def _check_parameter(value: Any) -> bool | int | float | str | list[int]:
    """v2 parameters are scalars; ``layers`` may also be a list of ints (docs/architecture.md)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise ValueError("a parameter must be a string, number, boolean or a list of integers")


ParameterValue = Annotated[
    bool | int | float | str | list[int],
    PlainValidator(_check_parameter),
    WithJsonSchema(
        {
            "anyOf": [{"type": t} for t in ("boolean", "integer", "number", "string")]
            + [{"type": "array", "items": {"type": "integer"}}]
        }
    ),
]
Parameters = dict[str, ParameterValue]
Dim = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Request):
    name: str
    shape: list[Dim]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(_Request):
    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Request):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Response):
    name: str
    shape: list[Dim]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(_Response):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(_Response):
    name: str
    version: str
    extensions: list[str] = []


class TensorMetadata(_Response):
    name: str
    datatype: Datatype
    shape: list[int]  # -1 marks a dynamic dimension


class TeacherParameters(BaseModel):
    """What our service adds to the model metadata: enough to build a :class:`TeacherInfo`."""

    model_config = ConfigDict(extra="allow")

    num_layers: int
    hidden_size: int
    num_labels: int
    labels: list[str]
    vocab_size: int
    max_seq_length: int
    revision: str | None = None
    flops_per_token: float | None = None
    intermediate_size: int | None = None
    model_type: str | None = None
    tokenizer_class: str | None = None
    tokenizer_vocab_sha256: str | None = None
    tokenizer_sha256: str | None = None
    flops_config: dict[str, Any] | None = None


class ModelMetadata(_Response):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: TeacherParameters | None = None

    def teacher_info(self) -> TeacherInfo:
        """The trainer's view of this model; a server that omits ``parameters`` is not ours."""
        if self.parameters is None:
            raise ValueError(
                f"model {self.name!r} metadata has no 'parameters' (not a teacher-server model?)"
            )
        p = self.parameters
        return TeacherInfo(
            name=self.name,
            num_layers=p.num_layers,
            hidden_size=p.hidden_size,
            num_labels=p.num_labels,
            label_names=tuple(p.labels),
            vocab_size=p.vocab_size,
            max_seq_length=p.max_seq_length,
            intermediate_size=p.intermediate_size,
            model_type=p.model_type,
            tokenizer_class=p.tokenizer_class,
            tokenizer_vocab_sha256=p.tokenizer_vocab_sha256,
            tokenizer_sha256=p.tokenizer_sha256,
            flops_config=p.flops_config,
        )


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: ``error`` is what tritonclient shows; ``field`` names the bad input."""

    error: str
    field: str | None = None
