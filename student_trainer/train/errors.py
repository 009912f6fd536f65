"""How a training run stops early, each with its own exit code (see :mod:`student_trainer.cli`)."""

from __future__ import annotations

from shared.errors import UserError


class TeacherUnavailable(UserError):
    """A teacher stayed down mid-run (after a checkpoint): its own exit code, unlike a usage error."""


class Interrupted(UserError):
    """SIGINT/SIGTERM stopped the run after a checkpoint of its last step."""
