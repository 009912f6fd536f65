"""Fine-tune a teacher: any BERT-family checkpoint (optionally only its first ``m`` layers) on a task.

A plain PyTorch loop: AdamW (no decay on biases and LayerNorm), linear warm-up then linear decay,
gradient clipping, evaluation with the task's metric at the end. The output directory is a
``save_pretrained`` checkpoint with its tokenizer and label names (``id2label``), which
``teacher-server`` loads unchanged, plus ``eval_results.json`` and ``training_args.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

from shared.errors import UserError
from shared.modeling import load_sequence_classifier
from student_trainer.data import TaskData, TokenizedDataset, collate_batch, load_train_and_eval
from student_trainer.metrics import compute_metrics


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneArguments:
    """`student-trainer finetune` options (Hugging Face ``TrainingArguments`` names)."""

    model_name_or_path: str = _option(None, "Checkpoint to fine-tune (local dir or hub id).")
    output_dir: str = _option(None, "Where the fine-tuned teacher is saved.")
    num_layers: int | None = _option(None, "Keep only the first m encoder layers (default: all).")
    task: str | None = _option(
        None, "Registered task (sst2, cola, mrpc, rte, mnli, qnli, qqp, sst5, imdb, ...)."
    )
    data_dir: str | None = _option(None, "Folder with the task's files (GLUE layout).")
    train_file: str | None = _option(None, "A .tsv/.csv/.jsonl training file instead of --task.")
    validation_file: str | None = _option(None, "The matching evaluation file.")
    text_columns: str = _option("sentence", "Comma-separated text column(s) of --train_file.")
    label_column: str = _option("label", "Label column of --train_file.")
    skip_bad_rows: bool = _option(False, "Skip (and count) malformed rows instead of failing.")
    max_train_samples: int | None = _option(None, "Use only the first N training examples.")
    max_eval_samples: int | None = _option(None, "Use only the first N evaluation examples.")
    max_seq_length: int = _option(128, "Truncate inputs to this many tokens.")
    learning_rate: float = _option(2e-5, "Peak AdamW learning rate.")
    weight_decay: float = _option(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    max_grad_norm: float = _option(1.0, "Gradient clipping norm (0 disables clipping).")
    num_train_epochs: float = _option(3.0, "Epochs (fractions allowed); --max_steps > 0 overrides.")
    max_steps: int = _option(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    per_device_train_batch_size: int = _option(32, "Training batch size.")
    per_device_eval_batch_size: int = _option(64, "Evaluation batch size.")
    warmup_ratio: float = _option(0.1, "Fraction of the steps used for linear warm-up.")
    seed: int = _option(42, "Seed for the head's initialisation, data order and dropout.")
    logging_steps: int = _option(50, "Print the running loss every N steps.")
    device: str = _option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    disable_tqdm: bool = _option(False, "Hide the progress bar.")

    def validate(self) -> FinetuneArguments:
        for name in ("model_name_or_path", "output_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError("--num_train_epochs must be > 0 (or give --max_steps)")
        if self.logging_steps < 1:
            raise UserError(f"--logging_steps must be >= 1, got {self.logging_steps}")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, auto)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adamw_with_decay_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW where biases and LayerNorm weights (1-d parameters) are not decayed, as in BERT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate)


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {key: batch[key].to(device) for key in keys}


@torch.inference_mode()
def predict(
    model: PreTrainedModel,
    dataset: TokenizedDataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, float | None]:
    """Predicted labels for every item in order, and the mean cross-entropy when labelled."""
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=partial(collate_batch, pad_token_id=pad_token_id)
    )
    predictions, loss_sum = [], 0.0
    for batch in loader:
        logits = model(**_model_inputs(batch, device)).logits.float()
        predictions.append(logits.argmax(dim=-1).cpu())
        if dataset.data.is_labelled:
            loss_sum += torch.nn.functional.cross_entropy(
                logits, batch["labels"].to(device), reduction="sum"
            ).item()
    return torch.cat(predictions), (loss_sum / len(dataset) if dataset.data.is_labelled else None)


def evaluate(
    model: PreTrainedModel,
    dataset: TokenizedDataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> dict[str, float]:
    """``eval_<metric>`` for the task's metric (accuracy always), ``eval_loss``, ``eval_samples``."""
    predictions, loss = predict(model, dataset, batch_size, pad_token_id, device)
    labels = torch.tensor([e.label for e in dataset.data.examples])
    results = {f"eval_{k}": v for k, v in compute_metrics(dataset.data.metric, predictions, labels).items()}
    return {**results, "eval_loss": loss, "eval_samples": len(dataset)}


def _total_steps(args: FinetuneArguments, steps_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Train, evaluate, save; returns the results written to ``eval_results.json`` (plus training stats)."""
    args.validate()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    train_data, eval_data = load_train_and_eval(
        task=args.task,
        data_dir=args.data_dir,
        train_file=args.train_file,
        validation_file=args.validation_file,
        text_columns=args.text_columns,
        label_column=args.label_column,
        skip_bad_rows=args.skip_bad_rows,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    if not train_data.is_labelled:
        raise UserError("the training data has no labels")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {args.model_name_or_path!r}: {err}") from err
    model = load_sequence_classifier(
        args.model_name_or_path, label_names=train_data.label_names, num_layers=args.num_layers, device=device
    )
    train_set = TokenizedDataset(train_data, tokenizer, args.max_seq_length)
    eval_set = TokenizedDataset(eval_data, tokenizer, args.max_seq_length) if eval_data is not None else None

    collate = partial(collate_batch, pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        train_set,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
    )
    total_steps = _total_steps(args, len(loader))
    optimizer = adamw_with_decay_groups(model, args.learning_rate, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    print(
        f"finetune: {train_data.name} train={len(train_set)} eval={len(eval_set) if eval_set else 0} "
        f"labels={train_data.label_names} layers={model.config.num_hidden_layers} steps={total_steps} "
        f"device={device}"
    )
    started = time.perf_counter()
    step, running_loss, running_count, losses = 0, 0.0, 0, []
    progress = tqdm(total=total_steps, desc="finetune", disable=args.disable_tqdm)
    model.train()
    while step < total_steps:
        for batch in loader:
            loss = model(**_model_inputs(batch, device), labels=batch["labels"].to(device)).loss
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_loss, running_count = running_loss + loss.item(), running_count + 1
            losses.append(loss.item())
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                mean = running_loss / running_count
                progress.write(
                    f"step {step}/{total_steps} loss {mean:.4f} lr {scheduler.get_last_lr()[0]:.2e}"
                )
                running_loss, running_count = 0.0, 0
            if step >= total_steps:
                break
    progress.close()
    train_runtime = time.perf_counter() - started

    results: dict[str, Any] = {
        "train_loss": float(np.mean(losses)),
        "train_steps": step,
        "epoch": step / len(loader),
        "train_runtime": train_runtime,
        "train_samples_per_second": step * args.per_device_train_batch_size / train_runtime,
    }
    if eval_set is not None:
        results.update(
            evaluate(model, eval_set, args.per_device_eval_batch_size, tokenizer.pad_token_id, device)
        )
    save_teacher(model, tokenizer, args, results, train_data)
    return results


def save_teacher(
    model: PreTrainedModel, tokenizer, args: FinetuneArguments, results: dict, data: TaskData
) -> Path:
    """A directory ``teacher-server`` loads unchanged: weights, config with id2label, tokenizer."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.finetuning_task = data.name
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "training_args.json").write_text(
        json.dumps(dataclasses.asdict(args), indent=2) + "\n", encoding="utf-8"
    )
    return output_dir
