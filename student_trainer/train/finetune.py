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
import time
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
from student_trainer.args.finetune import FinetuneArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tasks import TaskData
from student_trainer.data.tokenized import TokenizedDataset, collate_batch, model_inputs
from student_trainer.train.distributed import resolve_device
from student_trainer.train.evaluate import evaluate
from student_trainer.train.optim import adamw_with_decay_groups


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
    if eval_set is not None and eval_set.data.is_labelled:
        scores = evaluate(
            model, eval_set, eval_set.data.metric, tokenizer.pad_token_id, args.per_device_eval_batch_size
        )
        results.update({**scores, "eval_samples": len(eval_set)})
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
