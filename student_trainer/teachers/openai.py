"""Teachers behind OpenAI-compatible servers (vLLM, llama.cpp, SGLang, TGI, hosted APIs).

``openai+URL[,URL...]#MODEL`` (``URL`` ends in ``/v1``) asks a causal LM a prompt per row
(:class:`~shared.prompting.LabelPrompt`) for one next token with its top-``k`` log-probabilities,
and turns the label words' log-probabilities into class logits
(:mod:`student_trainer.teachers.label_logprobs`). ``chat: true`` sends each row as a user message
to ``/chat/completions`` (one request per row, all at once); otherwise one ``/completions``
request carries every row of the query. Greedy, one token: the answer is deterministic, so it can
be stored and reused.

Replicas, retries (``429``/``503`` with ``Retry-After``), failover and cool-downs are the HTTP
backend's own (:class:`~student_trainer.teachers.http.HttpTeacherClient`); readiness is ``GET
/v1/models`` listing the model.

**Label words of several tokens.** The next token decides a class, so a label word counts by its
first token. A server with vLLM's ``/tokenize`` and ``/detokenize`` (beside ``/v1``) is asked at
start-up what that first token is; elsewhere each label word must be one token as the server
writes it. Two classes whose words begin with the same token cannot be told apart: refused.

**Cost.** The server's ``usage`` (prompt + completion tokens) is the answer's ``tokens``; a
server that reports no usage is counted 0 tokens (with a warning). Calls are the rows sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import torch

from shared.flops import FlopsShape
from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.teachers.client import TeacherRequestError
from student_trainer.teachers.http import TRANSPORT_ERRORS, HttpTeacherClient, _describe, _Replica, _send
from student_trainer.teachers.label_logprobs import class_logits

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # vLLM's default cap (--max-logprobs); OpenAI's chat API allows 20 too
DEFAULT_CONTEXT = 2048  # a server that does not say its context length (vLLM says max_model_len)
JSON = {"Content-Type": "application/json"}


def uncounted_flops(num_labels: int) -> dict[str, Any]:
    """The ``flops_config`` of a teacher whose architecture the trainer cannot see: zero FLOPs, so
    its cost is what the server reports (tokens) and the rows sent (calls)."""
    return dataclasses.asdict(FlopsShape("remote", 0, 0, 0, num_labels))


class OutOfProtocol(ValueError):
    """A 200 answer whose body is not what the API promises."""


class OpenAITeacherClient(HttpTeacherClient):
    """A prompted teacher behind OpenAI-compatible replicas (see the module docstring)."""

    health_path = "/models"

    def __init__(
        self,
        urls: list[str],
        *,
        model: str,
        prompt: LabelPrompt | None = None,
        top_logprobs: int = TOP_LOGPROBS,
        **options: Any,
    ):
        if prompt is None:
            raise TeacherRequestError(
                f"teacher {model!r}: an OpenAI-compatible teacher needs --teacher_prompt NAME=FILE "
                "(its prompt and label_words)"
            )
        super().__init__(urls, model=model, **options)
        self.prompt = prompt
        self.top_logprobs = top_logprobs
        self.first_tokens: tuple[tuple[str, ...], ...] = tuple(words for _, words in prompt.label_words)
        self._warned_usage = False

    # --- start-up --------------------------------------------------------------------------------

    async def _not_ready(self, replica: _Replica, deadline: float) -> str | None:
        """None once ``/models`` answers and lists the model (an unknown model is refused at once)."""
        timeout = max(0.05, min(self.timeout_s, 5.0, deadline - time.monotonic()))
        try:
            reply = await _send(replica, "GET", "/models", timeout_s=timeout)
        except TRANSPORT_ERRORS as err:
            return _describe(err)
        if reply.status_code in (401, 403):
            raise self._refusal(replica, reply)
        if reply.status_code != 200:
            return f"server not ready (HTTP {reply.status_code})"
        self._model_entry(replica, reply.content)
        return None

    def _model_entry(self, replica: _Replica, content: bytes) -> dict[str, Any]:
        try:
            models = {m["id"]: m for m in json.loads(content)["data"]}
        except (ValueError, KeyError, TypeError) as err:
            raise TeacherRequestError(f"{replica.url}/models: not an OpenAI model list: {err}") from err
        if self.model not in models:
            served = sorted(models)
            raise TeacherRequestError(
                f"teacher {self.model!r} is not served at {replica.url} (it serves {served})", status=404
            )
        return models[self.model]

    async def _fetch_info(self, replica: _Replica) -> TeacherInfo:
        entry = self._model_entry(replica, (await self._get(replica, "/models", "model list")).content)
        self.first_tokens = await self._first_tokens(replica)
        return TeacherInfo(
            name=self.model,
            num_layers=1,  # unknown, and no hidden states are served
            hidden_size=0,
            num_labels=len(self.prompt.label_words),
            label_names=self.prompt.labels,
            vocab_size=0,
            max_seq_length=int(entry.get("max_model_len") or DEFAULT_CONTEXT),
            flops_config=uncounted_flops(len(self.prompt.label_words)),
            text_only=True,
        )

    async def _first_tokens(self, replica: _Replica) -> tuple[tuple[str, ...], ...]:
        """Each label word's first token as the server writes it, where it can tell (vLLM's
        ``/tokenize`` + ``/detokenize``); else the words themselves (see the module docstring)."""
        root = _Replica(replica.url.removesuffix("/v1"), session=replica.session)
        firsts = []
        for label, words in self.prompt.label_words:
            mapped = []
            for word in words:
                ids = await self._call_json(root, "/tokenize", {"model": self.model, "prompt": word,
                                                                "add_special_tokens": False})  # fmt: skip
                if ids is None:
                    return tuple(words for _, words in self.prompt.label_words)
                tokens = ids.get("tokens") or []
                if len(tokens) > 1:
                    log.info("label word %r of %r is %d tokens: the first decides", word, label, len(tokens))
                text = await self._call_json(root, "/detokenize", {"model": self.model, "tokens": tokens[:1]})
                mapped.append(str((text or {}).get("prompt", word)))
            firsts.append(tuple(dict.fromkeys(mapped)))
        seen = [token for tokens in firsts for token in tokens]
        if len(set(seen)) != len(seen):
            shared_first = dict(zip(self.prompt.labels, firsts, strict=True))
            raise TeacherRequestError(
                f"teacher {self.model!r}: label words of different classes begin with the same token "
                f"({shared_first}): choose words that differ in their first token"
            )
        return tuple(firsts)

    async def _call_json(self, replica: _Replica, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """One start-up POST; None when the server has no such endpoint."""
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

    # --- queries ---------------------------------------------------------------------------------

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        """Class logits of every row; ``tokens`` is what the server's ``usage`` reports."""
        if not isinstance(query, TextQuery):
            raise TeacherRequestError(f"teacher {self.model!r} reads text, not token ids")
        if query.cls_layers or query.token_layers:
            raise TeacherRequestError(f"teacher {self.model!r} answers class logits only, not hidden states")
        pairs = query.text_pair or [None] * len(query.text)
        prompts = [self.prompt.render(text, pair) for text, pair in zip(query.text, pairs, strict=True)]
        if self.prompt.chat:
            answers = await asyncio.gather(*(self._ask("/chat/completions", [p]) for p in prompts))
        else:
            answers = [await self._ask("/completions", prompts)]
        tops = [top for rows, _ in answers for top in rows]
        tokens = sum(used for _, used in answers)
        logits = torch.tensor([class_logits(top, self.first_tokens) for top in tops], dtype=torch.float32)
        return TeacherAnswer(logits, None, None, teacher_flops=0, tokens=tokens, padded_tokens=tokens)

    async def _ask(self, path: str, prompts: list[str]) -> tuple[list[dict[str, float]], int]:
        """One request: each prompt's top next tokens and the tokens the server counted."""
        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if path == "/chat/completions":
            body |= {"messages": [{"role": "user", "content": prompts[0]}], "logprobs": True,
                     "top_logprobs": self.top_logprobs}  # fmt: skip
        else:
            body |= {"prompt": prompts, "logprobs": self.top_logprobs}
        replica, reply = await self._post(path, json.dumps(body).encode(), JSON)
        try:
            answer = json.loads(reply.content)
            tops = _top_logprobs(answer, len(prompts), chat=path == "/chat/completions")
        except (OutOfProtocol, ValueError, KeyError, TypeError, IndexError) as err:
            raise TeacherRequestError(f"{replica.url}{path}: answer outside the protocol: {err}") from err
        return tops, self._usage(answer)

    def _usage(self, answer: dict[str, Any]) -> int:
        usage = answer.get("usage") or {}
        if "prompt_tokens" not in usage and not self._warned_usage:
            log.warning("teacher %r reports no usage: its tokens count as 0", self.model)
            self._warned_usage = True
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def _top_logprobs(answer: dict[str, Any], rows: int, *, chat: bool) -> list[dict[str, float]]:
    """Each choice's top next tokens (in prompt order: ``index``) as ``{token: logprob}``."""
    choices = sorted(answer["choices"], key=lambda choice: choice.get("index", 0))
    if len(choices) != rows:
        raise OutOfProtocol(f"{len(choices)} choices for {rows} prompts")
    tops = []
    for choice in choices:
        logprobs = choice.get("logprobs")
        if not logprobs:
            raise OutOfProtocol("no logprobs in a choice (does the server support them?)")
        if chat:
            first = logprobs["content"][0]
            tops.append({entry["token"]: float(entry["logprob"]) for entry in first["top_logprobs"]})
        else:
            tops.append({token: float(lp) for token, lp in logprobs["top_logprobs"][0].items()})
    return tops
