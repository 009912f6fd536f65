"""One interface to a teacher, two backends: the HTTP service and an in-process model.

The trainer only ever talks to :class:`TeacherClient`. ``make_teacher_client`` picks the
backend from the spec string the user passes on the command line:

* ``URL[,URL...]`` or ``URL[,URL...]#MODEL``: one or more replicas of the same teacher
  served by ``teacher-server`` (least-outstanding-requests balancing, retries, failover);
  the model name defaults to the teacher's role (``small`` / ``large``); ``...#MODEL@HOST``
  sends ``Host: HOST`` (a KServe InferenceService behind its ingress gateway's address);
* ``openai+URL[,URL...]#MODEL``: a causal LM behind an OpenAI-compatible server (vLLM, llama.cpp,
  SGLang, TGI), asked the prompt given with ``prompt`` (see ``student_trainer.teachers.openai``);
* ``vllm+URL[,URL...]#MODEL``: a sequence classifier behind vLLM's ``/classify``;
* ``local:PATH``: the checkpoint at ``PATH`` runs in this process with the service's own
  engine, for offline runs and comparisons. Outputs, shapes and ``tokens`` match the service;
  ``teacher_flops``/``padded_tokens`` match when the service runs the request alone in one pass
  (both drop all-padding columns); otherwise they differ, usually in the service's favour,
  since it also splits rows into passes and batches them across requests by length (see
  ``student_trainer.teachers.local``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

from shared.errors import UserError
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery

log = logging.getLogger(__name__)

__all__ = [
    "TeacherAnswer",
    "TeacherCallError",
    "TeacherClient",
    "TeacherInfo",
    "TeacherQuery",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "TextQuery",
    "ask_teachers",
    "in_data_label_order",
    "make_teacher_client",
]


class TeacherUnavailableError(UserError):
    """No replica answered within the retry budget (or became ready in time)."""


class TeacherRequestError(UserError):
    """The service refused the request (4xx) or answered outside the protocol: retrying cannot help."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class TeacherClient(Protocol):
    """What every backend offers. All calls are async so HTTP requests overlap."""

    info: TeacherInfo | None

    async def start(self, ready_timeout_s: float) -> TeacherInfo:
        """Wait until the teacher is ready (bounded), fetch and return its metadata."""
        ...

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        """Run one query (token ids, or raw text the teacher tokenizes); retries and failover are
        the backend's business."""
        ...

    async def aclose(self) -> None: ...


# ``KIND+URL#MODEL``: a teacher behind a server that is not this service
REMOTE_KINDS = {
    "openai": ("student_trainer.teachers.openai", "OpenAITeacherClient"),
    "vllm": ("student_trainer.teachers.vllm_classify", "VllmClassifyClient"),
}


def remote_kind(spec: str) -> str | None:
    """The kind of server a spec names when it is not this service (``openai``, …), else None."""
    scheme, plus, _ = spec.partition("+")
    return scheme if plus and scheme in REMOTE_KINDS else None


def make_teacher_client(spec: str, *, name: str, **options: object) -> TeacherClient:
    """Build the backend a spec names (see module docstring); ``options`` go to the backend."""
    if spec.startswith("local:"):
        from student_trainer.teachers.local import LocalTeacherClient

        return LocalTeacherClient(spec.removeprefix("local:"), name=name, **options)  # type: ignore[arg-type]
    scheme = remote_kind(spec)
    if scheme is not None:
        urls, _, model = spec.removeprefix(f"{scheme}+").partition("#")
        if not model:
            raise UserError(f"teacher {name}: {spec!r} names no model: {scheme}+URL#MODEL")
        module, cls = REMOTE_KINDS[scheme]
        backend = getattr(importlib.import_module(module), cls)
        return backend(_url_list(urls), model=model, **options)  # type: ignore[no-any-return]
    from student_trainer.teachers.http import HttpTeacherClient

    urls, _, target = spec.partition("#")
    model, _, host = target.partition("@")
    return HttpTeacherClient(
        _url_list(urls),
        model=model or name,
        host=host or None,
        **options,  # type: ignore[arg-type]
    )


def _url_list(urls: str) -> list[str]:
    return [u.strip() for u in urls.split(",") if u.strip()]


class TeacherCallError(Exception):
    """A teacher did not answer (after its client's own retries); names the teacher."""

    def __init__(self, role: str, cause: BaseException):
        super().__init__(f"teacher {role!r} failed: {type(cause).__name__}: {cause}")
        self.role = role


async def ask_teachers(
    clients: Mapping[str, TeacherClient],
    queries: Mapping[str, TeacherQuery | TextQuery],
    ready_timeout_s: float,
) -> dict[str, TeacherAnswer]:
    """Send every query at once; if one teacher fails for good, cancel the others and raise.

    A client gives up after its own retries; the teacher may still be restarting, so wait
    (at most ``ready_timeout_s``) for it to report ready again — as the same model — and ask
    once more. A request the teacher refused (4xx) is not asked again.
    """

    async def ask(role: str) -> TeacherAnswer:
        client = clients[role]
        try:
            return await client.infer(queries[role])
        except TeacherRequestError as refused:  # a 4xx: the same request would be refused again
            raise TeacherCallError(role, refused) from refused
        except Exception as first:
            log.warning(
                "teacher %r failed (%s): waiting up to %g s for it to be ready again, then giving up",
                role,
                first,
                ready_timeout_s,
            )
            known = client.info
            try:
                info = await client.start(ready_timeout_s)
                if known is not None and info != known:
                    raise RuntimeError(f"came back as a different model: {info} (was {known})")
                return await client.infer(queries[role])
            except Exception as err:
                raise TeacherCallError(role, err) from first

    tasks = {role: asyncio.ensure_future(ask(role)) for role in queries}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        raise
    return {role: task.result() for role, task in tasks.items()}


def in_data_label_order(answer: TeacherAnswer, order: list[int] | None) -> TeacherAnswer:
    """The answer with its logit columns in the data's label order (see ``teacher_label_order``)."""
    if order is None or answer.logits is None:
        return answer
    return replace(answer, logits=answer.logits[:, order])
