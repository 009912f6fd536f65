"""How a training run stops early, each with its own exit code (see :mod:`student_trainer.cli`)."""

from __future__ import annotations

from shared.errors import UserError


class TeacherUnavailable(UserError):
    """A teacher stayed down mid-run (after a checkpoint): its own exit code, unlike a usage error."""


class Interrupted(UserError):
    """SIGINT/SIGTERM stopped the run after a checkpoint of its last step."""


class NonFiniteLoss(UserError):
    """The loss was NaN or infinite: the run stopped before the optimizer step, no checkpoint written."""


class CheckpointWriteError(UserError):
    """The file system refused a checkpoint (a full disk): its partial folder removed, the run stopped."""
