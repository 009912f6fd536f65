"""KServe Open Inference Protocol v2: server and model metadata, model readiness, inference.

The infer handler does no heavy work on the event loop: decoding and tokenizing run on the
teacher's preprocessing thread, rendering and encoding the answer on a worker thread (see
:mod:`teacher_server.v2_adapter`), so a large request cannot stall health probes or other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from shared.codec import HEADER_LENGTH
from shared.protocol import InferenceRequest, ModelMetadata, ServerMetadata
from teacher_server import __version__, v2_adapter
from teacher_server.deps import BatcherDep, BodyDep, EngineDep, ServiceDep, get_service, require_api_key
from teacher_server.errors import CLIENT_CLOSED_REQUEST, ServiceError

T = TypeVar("T")
router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": text, "field": "..."}}}}
    for code, text in {401: "missing or wrong API key", 404: "unknown teacher", 503: "not ready"}.items()
}


@router.get("/v2", summary="Server metadata", response_model=ServerMetadata)
def server_metadata() -> dict[str, Any]:
    return {"name": "teacher-server", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get(
    "/v2/models/{name}", summary="Model metadata", response_model=ModelMetadata, responses=ERROR_RESPONSES
)
def model_metadata(name: str, engine: EngineDep) -> dict[str, Any]:
    return v2_adapter.model_metadata(name, engine)


@router.get("/v2/models/{name}/ready", summary="Model ready", responses=ERROR_RESPONSES)
def model_ready(name: str, batcher: BatcherDep) -> JSONResponse:
    return JSONResponse({"name": name, "ready": True})


@router.post(
    "/v2/models/{name}/infer",
    summary="Inference (JSON or the binary tensor extension)",
    responses={
        **ERROR_RESPONSES,
        400: {"description": "malformed request, unknown input or output"},
        413: {"description": "body too large"},
        422: {"description": "bad values: token ids outside the vocabulary, too long, shapes differ"},
        429: {"description": "queue full; see Retry-After"},
        504: {"description": "deadline (timeout_ms) passed"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferenceRequest.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"JSON header of {HEADER_LENGTH} bytes, then the tensor blobs",
                },
            },
        }
    },
)
async def infer(
    name: str, request: Request, batcher: BatcherDep, body: BodyDep, service: ServiceDep
) -> Response:
    started = time.perf_counter()
    try:
        header_length = request.headers.get(HEADER_LENGTH)
        call = await batcher.preprocess(
            v2_adapter.decode, body, header_length, batcher.engine, batcher.config
        )
        answer = await unless_disconnected(request, batcher.infer(call.query, timeout_s=call.timeout_s))
        content, headers = await asyncio.to_thread(v2_adapter.encode, name, call, answer)
        service.metrics.requests.labels(name, "200").inc()  # errors: counted by the error handlers
        return Response(content, headers=headers)
    finally:
        service.metrics.latency.labels(name).observe(time.perf_counter() - started)


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
    service = get_service(request)
    name = request.path_params.get("name", "")
    model = name if any(t.name == name for t in service.config.teachers) else ""
    service.metrics.requests.labels(model, str(status)).inc()
