"""benchmarks/bare_server.py, the floor bench_server.py holds the service to: it must answer each
request with that request's own pass, as the service and the engine in-process do."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch

from shared.codec import HEADER_LENGTH, build_request_body, parse_response_body
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.config import TeacherConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bare_server import bare_app  # noqa: E402


def call(
    app, method: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict, bytes]:
    """One request through the ASGI app: status, headers, body."""
    scope = {
        "type": "http",
        "method": method,
        "path": "/v2/models/bare/infer",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, answer = sent
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, answer["body"]


def test_each_request_gets_its_own_pass(tiny_teachers):
    engine = TeacherEngine.from_config(TeacherConfig(name="t", path=str(tiny_teachers["small"])))
    app = bare_app(engine)
    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    body, headers = build_request_body(
        {"input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int32)}, outputs={"logits": None}
    )
    status, answer_headers, content = call(app, "POST", body, headers)
    logits = parse_response_body(content, answer_headers[HEADER_LENGTH.lower()]).outputs["logits"]
    assert status == 200
    torch.testing.assert_close(logits, engine.run(TeacherQuery(ids, mask)).logits, rtol=0, atol=0)
    assert call(app, "GET")[0] == 200  # the readiness poll
