"""Fine-tune a teacher: any BERT-family checkpoint (optionally only its first ``m`` layers) on a task.

A plain PyTorch loop: AdamW (no decay on biases and LayerNorm), linear warm-up then linear decay,
gradient clipping, evaluation with the task's metric at the end. The output directory is a
``save_pretrained`` checkpoint with its tokenizer and label names (``id2label``), which
``teacher-server`` loads unchanged, plus ``eval_results.json`` and ``training_args.json``.

With ``--save_steps N`` the loop saves, every N steps, what resuming needs (weights, optimizer,
schedule, RNG, the data order of the epoch and the position in it) to one file written atomically;
``--resume_from_checkpoint auto`` continues from it, to the same weights as a run never stopped. A
large teacher's fine-tuning on a CPU can take hours, and a stopped one need not start over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup, set_seed
from transformers.utils import logging as hf_logging

from shared.errors import UserError
from shared.modeling import load_sequence_classifier
from student_trainer.args.finetune import RESUME_FILE, FinetuneArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tasks import TaskData
from student_trainer.data.tokenized import TokenizedDataset, collate_batch, model_inputs
from student_trainer.train.checkpoint import capture_rng_state, restore_rng_state
from student_trainer.train.distributed import resolve_device
from student_trainer.train.evaluate import evaluate
from student_trainer.train.optim import adamw_with_decay_groups

# Options that do not change the weights: a run may resume under other values of these.
NOT_FINGERPRINTED = ("output_dir", "logging_steps", "disable_tqdm", "save_steps", "resume_from_checkpoint")


@dataclass
class Progress:
    """Where the loop is: enough, with the model, optimizer, schedule and RNG, to resume exactly."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    epoch_start_step: int = 0
    epoch_order: torch.Tensor | None = None  # the data generator's state before this epoch's order was drawn


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in model_inputs(batch).items()}


def _total_steps(args: FinetuneArguments, steps_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Train, evaluate, save; returns the results written to ``eval_results.json`` (plus training stats)."""
    args.validate()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": our log says what happens
    set_seed(args.seed)
    device = resolve_device(args.device)
    train_data, eval_data = load_train_and_eval_from(args)
    if not train_data.is_labelled:
        raise UserError("the training data has no labels")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {args.model_name_or_path!r}: {err}") from err
    model = load_sequence_classifier(
        args.model_name_or_path, label_names=train_data.label_names, num_layers=args.num_layers, device=device
    )
    max_len = min(args.max_seq_length, model.config.max_position_embeddings)  # longer has no positions
    train_set = TokenizedDataset(train_data, tokenizer, max_len)
    eval_set = TokenizedDataset(eval_data, tokenizer, max_len) if eval_data is not None else None

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
    optimizer = adamw_with_decay_groups(
        model.parameters(), learning_rate=args.learning_rate, weight_decay=args.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    print(
        f"finetune: {train_data.name} train={len(train_set)} eval={len(eval_set) if eval_set else 0} "
        f"labels={train_data.label_names} layers={model.config.num_hidden_layers} steps={total_steps} "
        f"device={device}"
    )
    resume_file = Path(args.output_dir) / RESUME_FILE
    progress = Progress()
    if args.resume_from_checkpoint == "auto" and resume_file.is_file():
        progress = load_progress(resume_file, args, model, optimizer, scheduler)
        print(f"finetune: resuming at step {progress.step}/{total_steps} from {resume_file}")
    started, first_step = time.perf_counter(), progress.step
    train_steps(args, model, loader, generator, optimizer, scheduler, total_steps, device, progress)
    train_runtime = time.perf_counter() - started
    step, losses = progress.step, progress.losses

    results: dict[str, Any] = {
        "train_loss": float(np.mean(losses)),
        "train_steps": step,
        "epoch": step / len(loader),
        "train_runtime": train_runtime,
        "train_samples_per_second": (step - first_step) * args.per_device_train_batch_size / train_runtime,
    }
    if eval_set is not None and eval_set.data.is_labelled:
        scores = evaluate(
            model, eval_set, eval_set.data.metric, tokenizer.pad_token_id, args.per_device_eval_batch_size
        )
        results.update({**scores, "eval_samples": len(eval_set)})
    save_teacher(model, tokenizer, args, results, train_data)
    resume_file.unlink(missing_ok=True)
    return results


def train_steps(
    args: FinetuneArguments,
    model: PreTrainedModel,
    loader: DataLoader,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    total_steps: int,
    device: torch.device,
    progress: Progress,
) -> None:
    """Optimizer steps until ``total_steps``, from wherever ``progress`` stands. A resumed epoch
    redraws its data order from the saved generator state and skips the batches already trained."""
    bar = tqdm(total=total_steps, initial=progress.step, desc="finetune", disable=args.disable_tqdm)
    running: list[float] = []
    model.train()
    while progress.step < total_steps:
        done_in_epoch = progress.step - progress.epoch_start_step
        if done_in_epoch and progress.epoch_order is not None:  # a saved state always has the order
            generator.set_state(progress.epoch_order)  # the loader redraws this epoch's order
        else:
            progress.epoch_order = generator.get_state()
        for position, batch in enumerate(loader):
            if position < done_in_epoch:
                continue  # trained before the run stopped
            loss = model(**_model_inputs(batch, device), labels=batch["labels"].to(device)).loss
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.losses.append(loss.item())
            running.append(progress.losses[-1])
            bar.update(1)
            if progress.step % args.logging_steps == 0 or progress.step == total_steps:
                lr = scheduler.get_last_lr()[0]
                bar.write(f"step {progress.step}/{total_steps} loss {np.mean(running):.4f} lr {lr:.2e}")
                running = []
            if progress.step >= total_steps:
                break
            if args.save_steps and progress.step % args.save_steps == 0:
                save_progress(args, model, optimizer, scheduler, progress)
        progress.epoch_start_step = progress.step
    bar.close()


def _fingerprint(args: FinetuneArguments) -> str:
    options = {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_FINGERPRINTED}
    return json.dumps(options, sort_keys=True, default=str)


def save_progress(
    args: FinetuneArguments, model: PreTrainedModel, optimizer: Any, scheduler: Any, progress: Progress
) -> None:
    """Everything resuming needs, in one file that appears whole (written beside it, then renamed)."""
    path = Path(args.output_dir) / RESUME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": _fingerprint(args),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "step": progress.step,
        "losses": progress.losses,
        "epoch_start_step": progress.epoch_start_step,
        "epoch_order": progress.epoch_order,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)


def load_progress(
    path: Path, args: FinetuneArguments, model: PreTrainedModel, optimizer: Any, scheduler: Any
) -> Progress:
    """Restore a saved state into the model, optimizer, schedule and RNG; refuse one of other options."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}): delete it to start afresh") from err
    if state["fingerprint"] != _fingerprint(args):
        raise UserError(
            f"{path} was saved by a fine-tuning with other options: delete it to start afresh, "
            "or give the same options"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return Progress(state["step"], state["losses"], state["epoch_start_step"], state["epoch_order"])


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
