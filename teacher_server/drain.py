"""Graceful drain, where uvicorn meets the service (slow clients: :mod:`teacher_server.http_protocol`).

* :class:`DrainMiddleware` counts the requests in flight and, once the service drains, answers
  every response with ``Connection: close`` so that keep-alive clients reconnect elsewhere
  instead of meeting a reset.
* :class:`DrainingServer`: on the first SIGTERM/SIGINT the service turns not-ready (readiness and
  new inference answer 503) while it keeps listening; once the requests in flight are answered
  and ``drain_grace_s`` has passed (load balancers need a moment to see the 503), uvicorn shuts
  down. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

from teacher_server.service import TeacherService

logger = logging.getLogger("teacher_server")


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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
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
        # one drain_timeout_s in all: uvicorn's own graceful wait gets what is left of it
        left = config.drain_timeout_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(0.0, left)
        super().handle_exit(sig, frame)
