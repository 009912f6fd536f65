"""One interface to a teacher, two backends: the HTTP service and an in-process model.

The trainer only ever talks to :class:`TeacherClient`. ``make_teacher_client`` picks the
backend from the spec string the user passes on the command line:

* ``URL[,URL...]`` or ``URL[,URL...]#MODEL``: one or more replicas of the same teacher
  served by ``teacher-server`` (least-outstanding-requests balancing, retries, failover);
  the model name defaults to the teacher's role (``small`` / ``large``);
* ``local:PATH``: the checkpoint at ``PATH`` runs in this process with the service's own
  engine, for offline runs and comparisons. Outputs, shapes and ``tokens`` match the service;
  ``teacher_flops``/``padded_tokens`` match when the service runs the request alone in one pass
  (both drop all-padding columns); otherwise they differ, usually in the service's favour,
  since it also splits rows into passes and batches them across requests by length (see
  ``student_trainer.teachers.local``).
"""

from __future__ import annotations

from typing import Protocol

from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery

__all__ = ["TeacherAnswer", "TeacherClient", "TeacherInfo", "TeacherQuery", "make_teacher_client"]


class TeacherClient(Protocol):
    """What every backend offers. All calls are async so HTTP requests overlap."""

    info: TeacherInfo | None

    async def start(self, ready_timeout_s: float) -> TeacherInfo:
        """Wait until the teacher is ready (bounded), fetch and return its metadata."""
        ...

    async def infer(self, query: TeacherQuery) -> TeacherAnswer:
        """Run one query; retries and failover are the backend's business."""
        ...

    async def aclose(self) -> None: ...


def make_teacher_client(spec: str, *, name: str, **options: object) -> TeacherClient:
    """Build the backend a spec names (see module docstring); ``options`` go to the backend."""
    if spec.startswith("local:"):
        from student_trainer.teachers.local import LocalTeacherClient

        return LocalTeacherClient(spec.removeprefix("local:"), name=name, **options)  # type: ignore[arg-type]
    from student_trainer.teachers.http import HttpTeacherClient

    urls, _, model = spec.partition("#")
    return HttpTeacherClient(
        [u.strip() for u in urls.split(",") if u.strip()],
        model=model or name,
        **options,  # type: ignore[arg-type]
    )
