"""The HTTP/1.1 connection: uvicorn's httptools protocol with bounds on what a client may send.

httptools is a C parser (~1 ms less per request than h11's pure Python on these 2 cores), but
uvicorn puts no bound on a request's headers: a 64 MB header held the event loop for seconds
before the API key was checked (``benchmarks/bench_header_flood.py``), and half-sent headers held
a connection forever. :class:`BoundedHttpProtocol` adds, per connection:

* a deadline for each request's headers, ``read_timeout_s`` (408; the body's own deadline is in
  :mod:`teacher_server.deps`): the clock starts when the connection opens or the previous answer
  is sent, and stops when the headers are complete;
* ``max_header_bytes`` (request line and headers) and ``max_headers`` (431);
* JSON for these refusals and for a request it cannot parse (400), like every other error, sent
  after the answers to the requests before it on the connection (pipelining), then closing.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.protocol import ErrorBody
from teacher_server.config import ServerConfig


class HeaderLimitExceeded(Exception):
    """Raised from a parser callback: stops httptools before it reads any further."""


def json_answer(status: int, message: str, field: str | None) -> bytes:
    """A complete closing response with the service's error body."""
    body = ErrorBody(error=message, field=field).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools with deadlines and size limits for request headers (see the module docstring)."""

    read_timeout_s = 60.0  # these three are set per server by :func:`bounded_protocol`
    max_header_bytes = 64 * 1024
    max_headers = 100
    header_timer: asyncio.TimerHandle | None = None
    headers_pending = False  # part of a request arrived, its headers are not complete yet
    reading_headers = True  # the next bytes belong to a request's headers
    received_bytes = 0  # bytes received while reading the current request's headers
    header_bytes = 0  # the current request's line and headers that the parser has handed over
    refusal: bytes | None = None  # the error answer this connection ends with

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # refused: nothing more is read from this connection
        if self.reading_headers:
            self.received_bytes += len(data)
        super().data_received(data)
        if self.reading_headers and self.received_bytes > self.max_header_bytes and self.refusal is None:
            self._refuse(self._too_large())  # a header still arriving: refused before it is all read

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.headers_pending = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        if len(self.headers) > self.max_headers:
            self.refusal = json_answer(
                431, f"more than {self.max_headers} request headers (max_headers)", "headers"
            )
            raise HeaderLimitExceeded  # uvicorn then calls send_400_response

    def on_headers_complete(self) -> None:
        self.headers_pending = self.reading_headers = False
        self.received_bytes = self.header_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_headers = True

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools could not parse, or what a limit stopped."""
        self._refuse(
            self.refusal
            or json_answer(
                400, "malformed HTTP request (for instance a body shorter than its Content-Length)", None
            )
        )

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # its headers are in already: it starts now, no deadline
        super().on_response_complete()
        if pipelined or self.transport.is_closing():
            return
        if self.refusal is not None:
            self._send_refusal()  # the requests before the refused one are answered
        else:
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _count(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > self.max_header_bytes:
            self.refusal = self._too_large()
            raise HeaderLimitExceeded  # uvicorn then calls send_400_response

    def _too_large(self) -> bytes:
        return json_answer(
            431, f"request headers exceed {self.max_header_bytes} bytes (max_header_bytes)", "headers"
        )

    def _refuse(self, answer: bytes) -> None:
        """End the connection with ``answer``, after answering the complete requests before it."""
        self.refusal = answer
        cycle = self.cycle
        unanswered = self.pipeline or (cycle is not None and not cycle.response_complete)
        if not unanswered or (cycle is not None and cycle.more_body):
            self._send_refusal()  # nothing before it, or the request at fault is the one being read

    def _send_refusal(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.refusal or b"")
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _timed_out(self) -> None:
        self.header_timer = None
        if self.headers_pending and self.refusal is None:  # part of a request came, never all of it
            message = f"request headers not received within {self.read_timeout_s:g} s"
            self._refuse(json_answer(408, message, "headers"))
        elif not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(config: ServerConfig) -> type[BoundedHttpProtocol]:
    """The protocol class for uvicorn's ``http=`` with ``config``'s limits."""
    limits = {
        "read_timeout_s": config.read_timeout_s,
        "max_header_bytes": config.max_header_bytes,
        "max_headers": config.max_headers,
    }
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), limits)
