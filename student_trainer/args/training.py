"""``TrainingArguments`` of `distill` and `finetune`: Hugging Face's own, every flag of them, with our
defaults where we have a reason (each field below says it), and the checks that turn a bad value into
one line before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from shared.errors import UserError
from student_trainer.args.common import option, require_non_negative, require_positive


@dataclass
class RunTrainingArguments(TrainingArguments):
    """What both commands change in ``TrainingArguments``, and the checks of both."""

    logging_steps: float = option(
        50,
        "Log (metrics.jsonl, report_to, the progress line) every N steps; ours 50 (HF 500): a CPU run "
        "is a few hundred steps, and every line carries the teachers' FLOPs so far.",
    )
    save_total_limit: int | None = option(
        2,
        "Keep at most N checkpoints, oldest deleted first (0 or none: keep all). Ours 2 (HF: all): each "
        "holds the optimizer state resume needs (about 200 MB for a 6-layer BERT-base student), so the "
        "newest to resume from and one before it in case the newest is lost or damaged.",
    )
    warmup_steps: float = option(
        0,
        "Linear warm-up: steps, or a fraction of the run when < 1 (--warmup_ratio is the same flag).",
        aliases=["--warmup_ratio"],
    )
    disable_tqdm: bool | None = option(
        None,
        "Hide the progress bars (a bare --disable_tqdm is true, as our flag always was).",
        nargs="?",
        const=True,
    )
    resume_from_checkpoint: str | None = option(
        None,
        "A checkpoint-<step> folder; 'latest' for the newest one in --output_dir; 'auto' for the newest "
        "one if there is any, else a fresh start (a job its supervisor restarts).",
    )
    overwrite_output_dir: bool = option(
        False, "Start afresh in an --output_dir that holds checkpoints of another run (deletes them)."
    )

    def __post_init__(self) -> None:
        self.given_output_dir = self.output_dir  # the Trainer's default folder is not ours to pick
        self.check()
        if self.save_total_limit == 0:
            self.save_total_limit = None  # 0 keeps all, as our flag always said
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True  # torchrun on CPU: accelerate sees the processes only with cpu=True
        super().__post_init__()

    def check(self) -> None:
        """The values that would fail deep inside torch or the loop, refused with a reason."""
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"]
        positive += ["learning_rate", "save_steps"] + (["eval_steps"] if self.eval_steps is not None else [])
        require_positive(self, *positive)
        require_non_negative(self, "weight_decay", "max_grad_norm", "adam_epsilon", "warmup_steps")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError("--num_train_epochs must be > 0 (or give --max_steps)")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise UserError(f"--save_total_limit must be >= 0 (0 keeps all), got {self.save_total_limit}")


@dataclass
class DistillTrainingArguments(RunTrainingArguments):
    """`distill`: Hugging Face's defaults, but for the fields of :class:`RunTrainingArguments` and these."""

    eval_strategy: str = option(
        "epoch",
        "When to evaluate during training (no, steps, epoch); ours epoch (HF no): the curve of the "
        "student's score is what a distillation is judged by.",
        choices=("no", "steps", "epoch"),
    )


@dataclass
class FinetuneTrainingArguments(RunTrainingArguments):
    """`finetune`: the fine-tuning recipe of BERT (Devlin et al., 2019) as our defaults: a teacher is
    fine-tuned once per task and every distillation is compared against it."""

    learning_rate: float = option(2e-5, "Peak AdamW learning rate; ours 2e-5 (BERT's recipe).")
    weight_decay: float = option(0.01, "AdamW weight decay; ours 0.01 (BERT's recipe).")
    per_device_train_batch_size: int = option(32, "Training batch size per process; ours 32 (BERT's recipe).")
    per_device_eval_batch_size: int = option(64, "Evaluation batch size; ours 64 (no gradients).")
    warmup_steps: float = option(
        0.1,
        "Linear warm-up: steps, or a fraction of the run when < 1 (--warmup_ratio is the same flag); "
        "ours 0.1 (BERT's recipe).",
        aliases=["--warmup_ratio"],
    )
    save_strategy: str = option(
        "no",
        "When to write checkpoints (no, steps, epoch); ours no (HF steps): a teacher's checkpoint is "
        "GBs; give --save_strategy steps --save_steps N to make a long fine-tuning resumable.",
        choices=("no", "steps", "epoch"),
    )
