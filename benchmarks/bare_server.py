"""The least a Python server can do for one infer request, the floor ``bench_server.py`` holds the
service to at 1 client:

    python benchmarks/bare_server.py --teacher PATH --port 8000 [--max_seq_length 128] [--device cpu]

uvicorn with the loop the service picks (uvloop where installed) and httptools, one bare ASGI app:
read the body, decode it (the binary tensor extension, :mod:`shared.codec`), run the teacher's pass
on the event loop's own thread (``TeacherEngine.run``, as in-process), encode the logits, answer. No
routing, dependencies, batcher, thread hop or metrics: what such a server gives against the engine
in-process is the transport's and the codec's price alone, paid right after a pass has run through
the caches.
``GET /v2/health/ready`` answers 200 once the teacher is loaded.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from shared.codec import HEADER_LENGTH, build_response_body, parse_request_body
from shared.teacher_api import TeacherQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.config import TeacherConfig


def bare_app(engine: TeacherEngine) -> Any:
    """The ASGI app: every POST is decoded and answered with its own pass, every GET with 200."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, headers = b"", {}
        if scope["method"] == "POST":
            request = parse_request_body(b"".join(chunks), _header(scope, HEADER_LENGTH.lower().encode()))
            ids, mask = (request.inputs[name].long() for name in ("input_ids", "attention_mask"))
            answer = engine.run(TeacherQuery(ids, mask))
            body, headers = build_response_body("bare", {"logits": answer.logits}, binary_outputs={"logits"})
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


def _header(scope: dict, name: bytes) -> str | None:
    return next((value.decode() for key, value in scope["headers"] if key == name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = TeacherConfig(
        name="bare", path=args.teacher, max_seq_length=args.max_seq_length, device=args.device
    )
    engine = TeacherEngine.from_config(config)
    uvicorn.run(bare_app(engine), port=args.port, log_level="warning", loop="auto", http="httptools")


if __name__ == "__main__":
    main()
