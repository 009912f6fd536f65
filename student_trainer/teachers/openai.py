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

**The most likely label word is always returned.** Where the server told the label words' token
ids (vLLM), the request restricts the one generated token to them (``allowed_token_ids``): the
token sampled is then the most likely label word, and vLLM returns the sampled token's
log-probability beside the top ``k`` — raw, before the restriction (verified with vLLM 0.32.0: a
label word at -37.3 came back at -37.3 with the same top 5). ``logit_bias`` behaves the same there.

**Cost.** The server's ``usage`` (prompt + completion tokens) is the answer's ``tokens``; a
server that reports no usage is counted 0 tokens (with a warning). Calls are the rows sent.
FLOPs where the served checkpoint's config can be read here (``remote.known_shape``): the
decoder over the prompt and the LM head over the vocabulary at its last token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import torch

from shared.flops import FlopsShape
from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.kd.ledger import uncounted_flops
from student_trainer.teachers.client import TeacherRequestError
from student_trainer.teachers.http import _Replica
from student_trainer.teachers.label_logprobs import class_logits
from student_trainer.teachers.remote import OutOfProtocol, RemoteTeacherClient, answer_flops, known_shape

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # vLLM's default cap (--max-logprobs); OpenAI's chat API allows 20 too
DEFAULT_CONTEXT = 2048  # a server that does not say its context length (vLLM says max_model_len)


class OpenAITeacherClient(RemoteTeacherClient):
    """A prompted teacher behind OpenAI-compatible replicas (see the module docstring)."""

    health_path = models_path = "/models"

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
        self.first_ids: list[int] = []  # their token ids, where the server can tell
        self.shape: FlopsShape | None = None  # the FLOPs model, where the checkpoint is readable here

    # --- start-up --------------------------------------------------------------------------------

    async def _fetch_info(self, replica: _Replica) -> TeacherInfo:
        entry = await self._fetch_entry(replica)
        self.shape = known_shape(entry, lm_head=True)
        self.first_tokens = await self._first_tokens(replica)
        return TeacherInfo(
            name=self.model,
            num_layers=1,  # unknown, and no hidden states are served
            hidden_size=0,
            num_labels=len(self.prompt.label_words),
            label_names=self.prompt.labels,
            vocab_size=0,
            max_seq_length=int(entry.get("max_model_len") or DEFAULT_CONTEXT),
            flops_config=uncounted_flops(len(self.prompt.label_words))
            if self.shape is None
            else dataclasses.asdict(self.shape),
            text_only=True,
        )

    async def _first_tokens(self, replica: _Replica) -> tuple[tuple[str, ...], ...]:
        """Each label word's first token as the server writes it, where it can tell (vLLM's
        ``/tokenize`` + ``/detokenize``); else the words themselves (see the module docstring)."""
        root = _Replica(replica.url.removesuffix("/v1"), session=replica.session)
        firsts, self.first_ids = [], []
        for label, words in self.prompt.label_words:
            mapped = []
            for word in words:
                ids = await self._call_json(root, "/tokenize", {"model": self.model, "prompt": word,
                                                                "add_special_tokens": False})  # fmt: skip
                if ids is None:
                    self.first_ids = []
                    return tuple(words for _, words in self.prompt.label_words)
                tokens = ids.get("tokens") or []
                if len(tokens) > 1:
                    log.info("label word %r of %r is %d tokens: the first decides", word, label, len(tokens))
                text = await self._call_json(root, "/detokenize", {"model": self.model, "tokens": tokens[:1]})
                mapped.append(str((text or {}).get("prompt", word)))
                self.first_ids += tokens[:1]
            firsts.append(tuple(dict.fromkeys(mapped)))
        seen = [token for tokens in firsts for token in tokens]
        if len(set(seen)) != len(seen):
            shared_first = dict(zip(self.prompt.labels, firsts, strict=True))
            raise TeacherRequestError(
                f"teacher {self.model!r}: label words of different classes begin with the same token "
                f"({shared_first}): choose words that differ in their first token"
            )
        return tuple(firsts)

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
        rows = [class_logits(top, self.first_tokens, self.top_logprobs) for top in tops]
        logits = torch.tensor(rows, dtype=torch.float32)
        flops = sum(answer_flops(self.shape, len(batch), used) for batch, used in answers)
        return TeacherAnswer(logits, None, None, teacher_flops=flops, tokens=tokens, padded_tokens=tokens)

    async def _ask(self, path: str, prompts: list[str]) -> tuple[list[dict[str, float]], int]:
        """One request: each prompt's top next tokens and the tokens the server counted."""
        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if path == "/chat/completions":
            body |= {"messages": [{"role": "user", "content": prompts[0]}], "logprobs": True,
                     "top_logprobs": self.top_logprobs}  # fmt: skip
        else:
            body |= {"prompt": prompts, "logprobs": self.top_logprobs}
        if self.first_ids:  # vLLM: the most likely label word is the token sampled, always returned
            body["allowed_token_ids"] = sorted(set(self.first_ids))
        answer = await self._post_json(path, body)
        with self._in_protocol(path):
            tops = _top_logprobs(answer, len(prompts), chat=path == "/chat/completions")
        return tops, self._usage(answer)


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
