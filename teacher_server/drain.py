"""Graceful drain, where uvicorn meets the service (slow clients: :mod:`teacher_server.http_protocol`).

* :class:`DrainMiddleware` counts the requests in flight and, once the service drains, answers
  every response with ``Connection: close`` so that keep-alive clients reconnect elsewhere
  instead of meeting a reset.
* :class:`DrainingServer`: on the first SIGTERM/SIGINT the service turns not-ready (readiness and
  new inference answer 503) while it keeps listening; once the requests in flight are answered
  and ``drain_grace_s`` has passed (load balancers need a moment to see the 503), it stops
  listening without resetting a connection (:meth:`DrainingServer._stop_listening`) and uvicorn
  shuts down. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import struct
import sys
import time
from types import FrameType
from typing import Any

import uvicorn

from teacher_server.service import TeacherService

logger = logging.getLogger("teacher_server")
CLOSE_LINGER_S = 0.25  # handshakes under way and their first requests are in by then (a LAN: ~1 ms)


class DrainMiddleware:
    """ASGI middleware: in-flight count, and ``Connection: close`` on every answer while draining."""

    def __init__(self, app: Any, service: TeacherService):
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self.service.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        self.service.in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.service.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on the first signal (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, service: TeacherService):
        super().__init__(config)
        self.service = service
        self.drain_task: asyncio.Task[None] | None = None
        self.stopped_by: int | None = None  # the first signal: the CLI's exit code says which

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopped_by = self.stopped_by or sig
        if self.service.draining or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain yet
            return
        self.service.draining = True
        logger.info("draining", extra={"event": "draining", "in_flight": self.service.in_flight})
        loop = asyncio.get_event_loop()  # a signal handler: wake the loop rather than touch it
        loop.call_soon_threadsafe(
            lambda: setattr(self, "drain_task", loop.create_task(self._drain(sig, frame)))
        )

    async def _drain(self, sig: int, frame: FrameType | None) -> None:
        config = self.service.config
        started = time.monotonic()
        while time.monotonic() - started < config.drain_timeout_s:
            if self.service.in_flight == 0 and time.monotonic() - started >= config.drain_grace_s:
                break
            await asyncio.sleep(0.05)
        await self._stop_listening()
        # one drain_timeout_s in all: uvicorn's own graceful wait gets what is left of it
        left = config.drain_timeout_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(0.0, left)
        super().handle_exit(sig, frame)

    async def _stop_listening(self) -> None:
        """Refuse new connections, answer those already made, then close the listeners.

        Closing a listener outright resets the connections waiting in its backlog, and uvicorn
        closes an accepted connection whose request has not arrived yet: requests sent as a drain
        ended met a reset. Instead the kernel first drops new connection attempts (clients resend
        their SYN a second later and find the port closed: refused, not reset), the connections
        it already made are accepted, and what they send within ``CLOSE_LINGER_S`` is answered
        503 with ``Connection: close``.
        """
        for server in self.servers:
            for listening in getattr(server, "sockets", ()):
                ignore_new_connections(listening)
        await asyncio.sleep(CLOSE_LINGER_S)
        for server in self.servers:
            server.close()


# Classic BPF over a TCP header: drop a segment with SYN and without ACK (a new connection), pass
# the rest (the handshakes under way complete, the connections made go on).
_DROP_SYN = b"".join(
    struct.pack("HBBI", *op)
    for op in (
        (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
        (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
        (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else pass
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: pass
    )
)
SO_ATTACH_FILTER = 26  # Linux


def ignore_new_connections(listening: socket.socket) -> None:
    """Make the kernel drop new connection attempts to a listening socket (Linux; a no-op elsewhere)."""
    if sys.platform != "linux":
        return
    program = ctypes.create_string_buffer(_DROP_SYN)
    fprog = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(program))
    with socket.socket(fileno=os.dup(listening.fileno())) as same:  # the same socket, another fd
        same.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
