"""student_trainer package: ``from student_trainer import DynamicKDTrainer`` is its Python API."""

from typing import Any

from shared.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (see shared/openmp.py)

__all__ = ["DynamicKDTrainer", "KDConfig"]


def __getattr__(name: str) -> Any:
    """Import the trainer (torch, transformers) only when it is asked for: the CLI starts faster."""
    if name == "DynamicKDTrainer":
        from student_trainer.train.trainer import DynamicKDTrainer

        return DynamicKDTrainer
    if name == "KDConfig":
        from student_trainer.kd.config import KDConfig

        return KDConfig
    raise AttributeError(f"module 'student_trainer' has no attribute {name!r}")
