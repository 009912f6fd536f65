"""A scriptable OpenAI-compatible server (completions, chat completions; vLLM's tokenize and
classify) for tests.

The next-token distribution of a prompt is ``dist(prompt)`` (token -> probability); the server
answers the top ``k`` of it as log-probabilities, as vLLM does. ``plan`` holds what the next
completion calls do ("429:<retry-after>", "503"), then they answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.test_http_client import ServerThread


def sentiment(prompt: str) -> dict[str, float]:
    """A toy LM: 'good' makes ' positive' likely, 'bad' ' negative'; some mass on other tokens."""
    lean = 0.5 if "good" in prompt else -0.5 if "bad" in prompt else 0.0
    return {" positive": 0.3 + lean / 2, " negative": 0.3 - lean / 2, " the": 0.2, " a": 0.1, " it": 0.06,
            " great": 0.04}  # fmt: skip


def classes(text: str) -> list[float]:
    """A toy classifier: the sentiment LM's two label words, renormalised."""
    dist = sentiment(text)
    total = dist[" negative"] + dist[" positive"]
    return [dist[" negative"] / total, dist[" positive"] / total]


class FakeOpenAI(ServerThread):
    def __init__(self, *, model: str = "fake-lm", dist: Callable[[str], dict[str, float]] = sentiment):
        self.model, self.dist = model, dist
        self.plan: list[str] = []
        self.usage = True
        self.tokenizer: dict[str, list[str]] | None = None  # word -> its tokens; None: no /tokenize
        self.requests: list[tuple[str, dict]] = []
        self.vocab: list[str] = []  # token strings by id, as /tokenize hands them out
        self.root: str | None = None  # where the served checkpoint lies (vLLM lists it)
        super().__init__(self._app())

    def top(self, prompt: str, k: int, allowed: list[int] | None = None) -> dict[str, float]:
        """The ``k`` most likely next tokens and, as vLLM does, the token sampled (the most
        likely of the ``allowed`` ids) besides, all with their raw log-probabilities."""
        dist = self.dist(prompt)
        ranked = sorted(dist.items(), key=lambda item: -item[1])[:k]
        if allowed:
            sampled = max((self.vocab[i] for i in allowed), key=lambda token: dist.get(token, 0.0))
            ranked.append((sampled, dist[sampled]))
        return {token: math.log(p) for token, p in ranked}

    def _app(self) -> FastAPI:
        app = FastAPI()
        vocab = self.vocab

        @app.get("/v1/models")
        def models() -> dict:
            entry = {"id": self.model, "object": "model", "max_model_len": 512, "root": self.root}
            return {"object": "list", "data": [entry]}

        async def received(kind: str, request: Request) -> tuple[dict, JSONResponse | None]:
            """The request's body, and the planned refusal if there is one."""
            body = await request.json()
            self.requests.append((kind, body))
            action = self.plan.pop(0) if self.plan else "ok"
            if action.startswith("429"):
                return body, JSONResponse({"error": {"message": "busy"}}, 429, {"Retry-After": action[4:]})
            if action == "503":
                return body, JSONResponse({"error": {"message": "loading"}}, 503)
            return body, None

        def usage(prompts: list[str]) -> dict:
            return {"usage": {"prompt_tokens": sum(len(p.split()) for p in prompts),
                              "completion_tokens": len(prompts)}} if self.usage else {}  # fmt: skip

        @app.post("/v1/completions")
        async def completions(request: Request):
            body, refusal = await received("completions", request)
            if refusal is not None:
                return refusal
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = [
                {"index": i, "text": next(iter(self.top(p, 1))),
                 "logprobs": {"top_logprobs": [self.top(p, body["logprobs"], body.get("allowed_token_ids"))]}}
                for i, p in enumerate(prompts)
            ]  # fmt: skip
            return {"choices": choices[::-1], **usage(prompts)}  # out of order: the index decides

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body, refusal = await received("chat", request)
            if refusal is not None:
                return refusal
            prompt = body["messages"][0]["content"]
            ranked = self.top(prompt, body["top_logprobs"], body.get("allowed_token_ids"))
            top = [{"token": t, "logprob": lp} for t, lp in ranked.items()]
            content = [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
            return {"choices": [{"index": 0, "logprobs": {"content": content}}], **usage([prompt])}

        @app.get("/health")
        def health() -> dict:
            return {}

        @app.post("/classify")
        async def classify(request: Request):
            body, refusal = await received("classify", request)
            if refusal is not None:
                return refusal
            data = [{"index": i, "probs": classes(text)} for i, text in enumerate(body["input"])]
            return {"data": data[::-1], **usage(body["input"])}

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await request.json()
            if self.tokenizer is None:
                return JSONResponse({"detail": "Not Found"}, 404)
            pieces = self.tokenizer[body["prompt"]]
            vocab.extend(p for p in pieces if p not in vocab)
            return {"tokens": [vocab.index(p) for p in pieces], "count": len(pieces)}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            return {"prompt": "".join(vocab[i] for i in (await request.json())["tokens"])}

        return app
