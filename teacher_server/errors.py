"""The errors the service answers with.

Each error carries its own HTTP status (and headers such as ``Retry-After``): the engine, the
batcher and the v2 adapter raise a :class:`ServiceError` subclass and one handler renders it, so
no route maps exception types to statuses. (Plain exceptions, no web framework: the engine
raises them in the trainer's in-process backend too; :mod:`teacher_server.handlers` renders them.)
"""

from __future__ import annotations

CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, the metrics and logs do


class ServiceError(Exception):
    """An error response: status, a message for humans, the request field at fault, extra headers."""

    status = 500

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.field, self.headers = message, field, headers
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    """Malformed request: unknown input or output, wrong datatype or shape, bad parameter (400)."""

    status = 400


class Unprocessable(ServiceError):
    """Well-formed but not answerable: values out of range, too long, too many rows (422)."""

    status = 422
