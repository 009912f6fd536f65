"""`student-trainer finetune` options (Hugging Face ``TrainingArguments`` names); the data options are
those of :class:`~student_trainer.args.common.DataArguments`."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError
from shared.model_path import require_model_dir
from student_trainer.args.builder import check_choices, option
from student_trainer.args.common import DataArguments, check_training_options, require_non_negative

RESUME_FILE = "finetune_state.pt"  # in the output dir while training; removed once the teacher is saved


@dataclass
class FinetuneArguments(DataArguments):
    """`student-trainer finetune` options (Hugging Face ``TrainingArguments`` names)."""

    model_name_or_path: str = option(None, "Checkpoint to fine-tune (local dir or hub id).")
    output_dir: str = option(None, "Where the fine-tuned teacher is saved.")
    num_layers: int | None = option(None, "Keep only the first m encoder layers (default: all).")
    learning_rate: float = option(2e-5, "Peak AdamW learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).")
    num_train_epochs: float = option(3.0, "Epochs (fractions allowed); --max_steps > 0 overrides.")
    max_steps: int = option(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    per_device_train_batch_size: int = option(32, "Training batch size.")
    per_device_eval_batch_size: int = option(64, "Evaluation batch size.")
    warmup_ratio: float = option(0.1, "Fraction of the steps used for linear warm-up.")
    seed: int = option(42, "Seed for the head's initialisation, data order and dropout.")
    logging_steps: int = option(50, "Print the running loss every N steps.")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    disable_tqdm: bool = option(False, "Hide the progress bar.")
    save_steps: int = option(
        0, f"Every N steps, save what resuming needs to OUTPUT_DIR/{RESUME_FILE} (0: never)."
    )
    resume_from_checkpoint: str | None = option(
        None,
        f"auto: continue from OUTPUT_DIR/{RESUME_FILE} when there is one (same weights as a run "
        "never stopped).",
        choices=("auto",),
    )

    def validate(self) -> FinetuneArguments:
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required")
        require_model_dir(self.model_name_or_path)
        check_training_options(self)
        check_choices(self)
        require_non_negative(self, "save_steps")
        self.check_data()
        return self
