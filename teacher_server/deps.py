"""Typed dependencies of the routes: the service, a teacher's batcher or engine, the body, the API key.

Every dependency is ``async def``, even those that never await: FastAPI runs a plain ``def``
dependency in its thread pool, a thread hop per dependency per request that competes with the
teacher's torch threads for the cores (the single-client regime of a dynamic-KD trainer).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect

from shared.errors import shown
from teacher_engine.engine import TeacherEngine
from teacher_server.batcher import DynamicBatcher
from teacher_server.errors import CLIENT_CLOSED_REQUEST, ServiceError
from teacher_server.service import TeacherService


def service_of(request: Request) -> TeacherService:
    """The service behind ``request``'s app (for code outside dependency injection)."""
    return request.app.state.service


async def get_service(request: Request) -> TeacherService:
    return service_of(request)


ServiceDep = Annotated[TeacherService, Depends(get_service)]
bearer = HTTPBearer(auto_error=False, description="the API key, when the server was started with one")


async def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], service: ServiceDep
) -> None:
    """401 unless ``Authorization: Bearer <key>`` matches (constant-time compare)."""
    if service.api_key is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, service.api_key.encode()):
        raise ServiceError(
            "missing or wrong API key", "Authorization", status=401, headers={"WWW-Authenticate": "Bearer"}
        )


async def get_batcher(name: str, service: ServiceDep) -> DynamicBatcher:
    """The named teacher's batcher: 404 if no such teacher, 503 while it loads or drains."""
    if all(t.name != name for t in service.config.teachers):
        known = ", ".join(t.name for t in service.config.teachers)
        raise ServiceError(f"no teacher named {shown(name)} (served: {known})", "model_name", status=404)
    if name not in service.batchers or service.draining:
        raise ServiceError(
            f"teacher {name!r} is not ready", "model_name", status=503, headers={"Retry-After": "1"}
        )
    return service.batchers[name]


BatcherDep = Annotated[DynamicBatcher, Depends(get_batcher)]


async def get_engine(batcher: BatcherDep) -> TeacherEngine:
    return batcher.engine


EngineDep = Annotated[TeacherEngine, Depends(get_engine)]


async def read_body(request: Request, service: ServiceDep) -> bytes:
    """The request body, refusing (413) anything over ``max_body_bytes`` without reading it all."""
    limit = service.config.max_body_bytes
    too_large = ServiceError(f"request body exceeds {limit} bytes", "body", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(service.config.read_timeout_s):  # a stalled upload holds nothing
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise ServiceError(
            f"request body not received within {service.config.read_timeout_s:g} s",
            "body",
            status=408,
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:  # hung up mid-upload: nobody to answer, but the metrics count it
        raise ServiceError(
            "client disconnected while sending the body", "body", status=CLIENT_CLOSED_REQUEST
        ) from None
    return b"".join(chunks)


BodyDep = Annotated[bytes, Depends(read_body)]
