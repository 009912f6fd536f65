"""SIGINT/SIGTERM stop a run gracefully: the step in progress finishes, a checkpoint is written, the
run stops (:class:`~student_trainer.train.errors.Interrupted`); a second signal stops at once."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from student_trainer.train.distributed import Processes, any_rank


class StopSignals:
    """The first SIGINT/SIGTERM is noted (the loop stops after the step); a second interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _note(self, sig: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = sig
        print(f"{signal.Signals(sig).name}: stopping after this step (again to stop now)", file=sys.stderr)


class StopOnSignal(TrainerCallback):
    """:class:`StopSignals` for a ``Trainer``: after the step a signal arrived in (on any process), a
    checkpoint and the end of training."""

    def __init__(self) -> None:
        self.signals = StopSignals()

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.signals.received = None
        self.signals.install()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        procs = Processes(args.process_index, args.world_size, args.device)
        if any_rank(self.signals.received is not None, procs):  # every process stops after the same step
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.signals.uninstall()
