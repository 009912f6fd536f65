"""Every error response, ours or the framework's, as ``{"error": ..., "field": ...}``: one handler
renders any :class:`~teacher_server.errors.ServiceError` with the status it carries."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.codec import field_name
from shared.errors import cut
from teacher_server.errors import ServiceError

logger = logging.getLogger("teacher_server")
# Messages quote client input cut short (shared.errors.shown); this bounds any message whatever it quotes.
MAX_ERROR_CHARS = 1024


def error_response(
    status: int, message: str, field: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": cut(message, MAX_ERROR_CHARS), "field": field and cut(field, MAX_ERROR_CHARS)}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, count_error: Callable[[Request, int], None]) -> None:
    """Ours and the framework's errors as ``{"error", "field"}``; ``count_error`` sees every failure."""

    async def service_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, ServiceError)
        count_error(request, err.status)
        return error_response(err.status, err.message, err.field, err.headers)

    async def validation_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        first = err.errors()[0]
        loc = [part for part in first["loc"] if part not in ("body", "path", "query", "header")]
        return error_response(422, first["msg"], field_name(loc) or None)

    async def http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        return error_response(err.status_code, str(err.detail), None, err.headers)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=err, extra={"event": "internal_error"})
        count_error(request, 500)
        return error_response(500, "internal server error", None)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
