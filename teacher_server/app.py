"""The HTTP face of the service: KServe Open Inference Protocol v2 over FastAPI.

``create_app(config)`` wires the pieces: the :class:`~teacher_server.service.TeacherService`
(teachers load and warm up in the background after start-up, so ``/v2/health/live`` answers at
once and ``/v2/health/ready`` turns 200 only when every teacher can serve), the routes
(:mod:`teacher_server.routes`) and one error handler (:mod:`teacher_server.handlers`). Tensors
travel as JSON or with the binary tensor extension (:mod:`shared.codec`, never pickle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from teacher_server import __version__
from teacher_server.config import ServerConfig
from teacher_server.deps import require_api_key
from teacher_server.drain import DrainMiddleware
from teacher_server.handlers import install_error_handlers
from teacher_server.routes import docs, health, v2
from teacher_server.service import TeacherService

# Answered by the connection itself (teacher_server.http_protocol), whatever the path
CONNECTION_ERRORS = {
    "400": "malformed HTTP request",
    "408": "the request's headers or body did not arrive within read_timeout_s",
    "431": "request headers over max_header_bytes, or more than max_headers of them",
}


def json_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def create_app(
    config: ServerConfig,
    *,
    api_key: str | None = None,
    key_for_docs_and_metrics: bool = False,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service for ``config``; ``on_load_failure`` lets the CLI exit when a teacher cannot load.
    With ``key_for_docs_and_metrics`` (and a key), the API document, its pages and ``/metrics``
    need the key too (see ``teacher-server --help`` for why that is not the default)."""
    service = TeacherService(config, api_key=api_key or None, on_load_failure=on_load_failure)
    private = bool(api_key and key_for_docs_and_metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load())
        yield
        loading.cancel()
        await service.close()

    app = FastAPI(
        title="teacher-server",
        version=__version__,
        description="BERT teachers over the KServe Open Inference Protocol v2, with dynamic batching.",
        lifespan=lifespan,
        **({"openapi_url": None, "docs_url": None, "redoc_url": None} if private else {}),
    )
    app.state.service = service
    app.add_middleware(DrainMiddleware, service=service)
    app.include_router(health.router)
    if private:
        app.include_router(
            health.metrics_router,
            dependencies=[Depends(require_api_key)],
            responses=v2.error_responses(v2.UNAUTHORIZED),
        )
        app.include_router(docs.router)
    else:
        app.include_router(health.metrics_router)
    app.include_router(v2.router)
    install_error_handlers(app, count_error=v2.count_infer_error)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the infer body's nested schemas, the served teachers' names and
        the errors any request may meet before it reaches a route (the connection's own)."""
        doc = default_openapi()
        doc.setdefault("components", {}).setdefault("schemas", {}).update(v2.INFER_SCHEMAS)
        names = [t.name for t in config.teachers]
        for operation in (op for path in doc["paths"].values() for op in path.values()):
            for code, text in CONNECTION_ERRORS.items():
                operation["responses"].setdefault(code, json_error(text))
            for parameter in operation.get("parameters", ()):
                if parameter["in"] == "path" and parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": names, "title": "Name"}
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    return app
