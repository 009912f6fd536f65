"""Liveness and readiness (never behind the API key: probes call them), and Prometheus metrics
(behind it only with ``--key_for_docs_and_metrics``: :func:`teacher_server.app.create_app`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from teacher_server.deps import ServiceDep

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])
READY_SCHEMA = {"type": "object", "properties": {"ready": {"type": "boolean"}}, "required": ["ready"]}


@router.get("/v2/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Server ready (all teachers loaded and warmed up)",
    responses={
        200: {"content": {"application/json": {"schema": READY_SCHEMA}}},
        503: {
            "description": "loading, or draining before shutdown",
            "content": {"application/json": {"schema": READY_SCHEMA}},
        },
    },
)
async def ready(service: ServiceDep) -> JSONResponse:
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
