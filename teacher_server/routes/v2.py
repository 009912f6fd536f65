"""KServe Open Inference Protocol v2: server and model metadata, model readiness, inference.

The infer handler does no heavy work on the event loop: bodies over ``INLINE_BYTES`` are decoded
and tokenized on worker threads, and answers over it encoded there (see
:mod:`teacher_server.v2_adapter`), so a large request cannot stall health probes or other requests;
a small one (a trainer's few rows, a client's few sentences) skips the thread hops, which cost
more than its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from shared.codec import HEADER_LENGTH
from shared.protocol import ErrorBody, InferenceRequest, InferenceResponse, ModelMetadata, ServerMetadata
from teacher_server import __version__, v2_adapter
from teacher_server.deps import BatcherDep, BodyDep, EngineDep, ServiceDep, require_api_key, service_of
from teacher_server.errors import CLIENT_CLOSED_REQUEST, ServiceError

T = TypeVar("T")
INLINE_BYTES = 64 * 1024  # bodies and answers up to this size are decoded / encoded on the event loop
router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


def error_responses(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses: every error body is an :class:`ErrorBody`."""
    return {code: {"description": text, "model": ErrorBody} for code, text in statuses.items()}


UNAUTHORIZED = {401: "missing or wrong API key (when the server has one)"}
MODEL_ERRORS = {
    **UNAUTHORIZED,
    404: "unknown teacher",
    422: "malformed path or parameters",
    503: "not ready, or draining (see Retry-After)",
}
# The infer body's schema, its nested models referenced from components/schemas (see app.py)
INFER_SCHEMA = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
RESPONSE_SCHEMA = InferenceResponse.model_json_schema(ref_template="#/components/schemas/{model}")
INFER_SCHEMAS: dict[str, Any] = {
    **INFER_SCHEMA.pop("$defs"),
    **RESPONSE_SCHEMA.pop("$defs"),
    "InferenceResponse": RESPONSE_SCHEMA,
}
INFER_EXAMPLE = {
    "inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [2, 10, 3]}],
    "outputs": [{"name": "logits"}],
}
BINARY_NOTE = (
    f"the binary tensor extension: the {HEADER_LENGTH} header gives the length of the leading JSON part, "
    "then the tensors' raw bytes"
)


@router.get(
    "/v2", summary="Server metadata", response_model=ServerMetadata, responses=error_responses(UNAUTHORIZED)
)
async def server_metadata() -> dict[str, Any]:
    return {"name": "teacher-server", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get(
    "/v2/models/{name}",
    summary="Model metadata",
    response_model=ModelMetadata,
    responses=error_responses(MODEL_ERRORS),
)
async def model_metadata(name: str, engine: EngineDep) -> dict[str, Any]:
    return v2_adapter.model_metadata(name, engine)


@router.get("/v2/models/{name}/ready", summary="Model ready", responses=error_responses(MODEL_ERRORS))
async def model_ready(name: str, batcher: BatcherDep) -> JSONResponse:
    return JSONResponse({"name": name, "ready": True})


@router.post(
    "/v2/models/{name}/infer",
    summary="Inference (JSON or the binary tensor extension)",
    response_class=Response,
    responses={
        200: {
            "description": f"the outputs: JSON, or (when binary outputs were asked for) {BINARY_NOTE}",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **error_responses(
            {
                **MODEL_ERRORS,
                400: "malformed request, unknown input or output, bad parameter",
                413: "body too large",
                422: "bad values: token ids outside the vocabulary, too long, shapes differ, layers",
                429: "queue full; see Retry-After",
                499: "the client hung up",
                504: "deadline (timeout_ms) passed",
            }
        ),
    },
    openapi_extra={
        "parameters": [
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": False,
                "description": (
                    f"with an application/octet-stream body: {BINARY_NOTE}; with an application/json "
                    "body it may be left out, or give the whole body's length"
                ),
                "schema": {"type": "integer", "minimum": 0},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": INFER_SCHEMA, "example": INFER_EXAMPLE},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"{BINARY_NOTE} (the header is required with this body)",
                },
            },
        },
    },
)
async def infer(
    name: str, request: Request, batcher: BatcherDep, body: BodyDep, service: ServiceDep
) -> Response:
    started = time.perf_counter()
    engine, config = batcher.engine, batcher.config
    try:
        header_length = request.headers.get(HEADER_LENGTH)
        decoded = await inline_if_small(len(body), v2_adapter.parse, body, header_length, engine, config)
        if v2_adapter.needs_tokenizer(decoded):
            small = len(body) <= INLINE_BYTES  # then tokenized on the loop too, if the tokenizer is free
            call = await batcher.preprocess(v2_adapter.to_call, decoded, engine, config, inline=small)
        else:
            call = v2_adapter.to_call(decoded, engine, config)  # the tensors are decoded: cheap
        answer = await unless_disconnected(request, batcher.infer(call.query, timeout_s=call.timeout_s))
        size = v2_adapter.output_bytes(call, engine)
        content, headers = await inline_if_small(size, v2_adapter.encode, name, call, answer)
        service.metrics.requests.labels(name, "200").inc()  # errors: counted by the error handlers
        return Response(content, headers=headers)
    finally:
        service.metrics.latency.labels(name).observe(time.perf_counter() - started)


async def inline_if_small(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on the event loop when ``size`` bytes are few (a thread hop costs 1-3 ms on a
    busy 2-core machine, decoding 64 KiB far less), else on a worker thread so health probes and
    other requests are not held up."""
    if size <= INLINE_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (so the batcher drops it) if the client hangs up first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ServiceError("client disconnected", status=CLIENT_CLOSED_REQUEST)
    return task.result()


def count_infer_error(request: Request, status: int) -> None:
    """Count a failed inference in ``teacher_requests_total``, also one its dependencies refused
    (401, 404, 413, 503) before the route ran; a name that is no teacher is counted as model ""
    so that clients cannot mint label values."""
    if request.scope.get("endpoint") is not infer:
        return
    service = service_of(request)
    name = request.path_params.get("name", "")
    model = name if any(t.name == name for t in service.config.teachers) else ""
    service.metrics.requests.labels(model, str(status)).inc()
