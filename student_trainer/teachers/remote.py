"""What the backends for teachers behind other servers share (OpenAI-compatible, vLLM's pooling).

Over the HTTP backend's replicas, retries and failover: readiness is the server's model list
naming the model (an unknown model is refused at once), requests and answers are JSON, and the
cost is the server's ``usage``, and FLOPs where the served checkpoint's config can be read here
(:func:`known_shape`); otherwise its FLOPs are 0 in the ledger
(:func:`~student_trainer.kd.ledger.uncounted_flops`): it is costed by tokens and calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from shared.flops import FlopsShape, encoder_forward_flops, next_token_shape
from student_trainer.kd.ledger import scaled_lengths
from student_trainer.teachers.client import TeacherRequestError
from student_trainer.teachers.http import TRANSPORT_ERRORS, HttpTeacherClient, _describe, _Replica, _send

log = logging.getLogger(__name__)

JSON = {"Content-Type": "application/json"}


def known_shape(entry: dict[str, Any], *, lm_head: bool = False) -> FlopsShape | None:
    """The FLOPs model of the served checkpoint, where its folder is readable here (vLLM lists it
    as ``root``: a server on this machine, or a shared volume) and its family is one the count
    knows; else None (the teacher is costed by tokens and calls). ``lm_head``: a causal LM asked
    for its next token, whose head runs over the whole vocabulary at the last token."""
    root = entry.get("root")
    if not isinstance(root, str) or not (Path(root) / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        return next_token_shape(config) if lm_head else FlopsShape.of(config)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        log.info("the FLOPs of the model at %s are not counted (%s): tokens and calls are", root, err)
        return None


def answer_flops(shape: FlopsShape | None, rows: int, tokens: int) -> int:
    """An answer's FLOPs on ``shape``: the server reports the request's tokens only, so each row
    counts an equal share of them (exact in total; only the small attention term depends on it)."""
    return (
        0
        if shape is None or not rows
        else encoder_forward_flops(shape, scaled_lengths([1] * rows, tokens / rows))
    )


class OutOfProtocol(ValueError):
    """A 200 answer whose body is not what the API promises."""


class RemoteTeacherClient(HttpTeacherClient):
    """The HTTP backend speaking JSON to a server that lists its models at ``models_path``."""

    models_path = "/v1/models"

    def __init__(self, urls: list[str], *, model: str, **options: Any):
        super().__init__(urls, model=model, **options)
        self._warned_usage = False

    async def _not_ready(self, replica: _Replica, deadline: float) -> str | None:
        """None once the health check passes and the model list names the model."""
        timeout = max(0.05, min(self.timeout_s, 5.0, deadline - time.monotonic()))
        try:
            for path in dict.fromkeys((self.health_path, self.models_path)):
                reply = await _send(replica, "GET", path, timeout_s=timeout)
                if reply.status_code in (401, 403):
                    raise self._refusal(replica, reply)
                if reply.status_code != 200:
                    return f"server not ready (HTTP {reply.status_code})"
        except TRANSPORT_ERRORS as err:
            return _describe(err)
        self._model_entry(replica, reply.content)
        return None

    async def _fetch_entry(self, replica: _Replica) -> dict[str, Any]:
        """The model's entry in the server's model list (``max_model_len`` and ``root`` on vLLM)."""
        return self._model_entry(replica, (await self._get(replica, self.models_path, "model list")).content)

    def _model_entry(self, replica: _Replica, content: bytes) -> dict[str, Any]:
        try:
            models = {m["id"]: m for m in json.loads(content)["data"]}
        except (ValueError, KeyError, TypeError) as err:
            raise TeacherRequestError(f"{replica.url}{self.models_path}: not a model list: {err}") from err
        if self.model not in models:
            served = sorted(models)
            raise TeacherRequestError(
                f"teacher {self.model!r} is not served at {replica.url} (it serves {served})", status=404
            )
        return models[self.model]

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request with the HTTP backend's retries; the answer's JSON object."""
        replica, reply = await self._post(path, json.dumps(body).encode(), JSON)
        with self._in_protocol(path, replica.url):
            answer = json.loads(reply.content)
            if not isinstance(answer, dict):
                raise OutOfProtocol(f"not a JSON object: {reply.text[:200]}")
            return answer

    @contextlib.contextmanager
    def _in_protocol(self, path: str, url: str = "") -> Iterator[None]:
        """An answer that is not what the API promises is a refusal naming the endpoint."""
        try:
            yield
        except (OutOfProtocol, ValueError, KeyError, TypeError, IndexError) as err:
            where = f"{url or self.urls[0]}{path}"
            message = f"teacher {self.model!r}: {where}: answer outside the protocol: {err}"
            raise TeacherRequestError(message) from err

    async def _call_json(self, replica: _Replica, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """One optional start-up POST; None when the server has no such endpoint."""
        try:
            encoded = json.dumps(body).encode()
            reply = await _send(replica, "POST", path, timeout_s=self.timeout_s, body=encoded, headers=JSON)
        except TRANSPORT_ERRORS:
            return None
        if reply.status_code != 200:
            return None
        try:
            loaded = json.loads(reply.content)
        except ValueError:
            return None
        return loaded if isinstance(loaded, dict) else None

    def _usage(self, answer: dict[str, Any]) -> int:
        """The tokens the server says the request cost (prompt + completion); 0, once warned, if none."""
        usage = answer.get("usage") or {}
        if "prompt_tokens" not in usage and not self._warned_usage:
            log.warning("teacher %r reports no usage: its tokens count as 0", self.model)
            self._warned_usage = True
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
