"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from teacher_server.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", summary="Server live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Server ready (all teachers loaded and warmed up)")
def ready(service: ServiceDep) -> JSONResponse:
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
