"""`student-trainer finetune`: fine-tune a teacher with the Hugging Face ``Trainer`` (no KD; its
checkpoints and loss guarded as ``distill``'s, :mod:`student_trainer.train.guarded`) on the options of
`distill` (:mod:`student_trainer.args.finetune`).

Any BERT-family checkpoint, optionally only its first ``m`` layers. The output folder is a
``save_pretrained`` checkpoint with its tokenizer and label names (``id2label``), which
``teacher-server`` loads unchanged, plus ``eval_results.json`` and ``training_args.json``. With
``--save_strategy steps`` a long fine-tuning writes ``checkpoint-N/`` folders that
``--resume_from_checkpoint latest|auto`` continues from (the same weights as a run never stopped);
they are deleted once the teacher is saved.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, set_seed
from transformers.utils import logging as hf_logging

from shared.errors import UserError
from shared.modeling import load_sequence_classifier
from student_trainer.args.finetune import FinetuneArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tokenized import TokenizedDataset, collate_batch
from student_trainer.train.checkpoint import list_checkpoints, prepare_output_dir
from student_trainer.train.evaluate import metric_function
from student_trainer.train.guarded import GuardedTrainer, train_results


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Train, evaluate, save; returns the results written to ``eval_results.json`` (plus training stats)."""
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": our log says what happens
    training = args.training
    set_seed(training.seed)
    train_data, eval_data = load_train_and_eval_from(args)
    if not train_data.is_labelled:
        raise UserError("the training data has no labels")
    checkpoint = prepare_output_dir(training)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {args.model_name_or_path!r}: {err}") from err
    model = load_sequence_classifier(
        args.model_name_or_path, label_names=train_data.label_names, num_layers=args.num_layers
    )
    max_len = min(args.max_seq_length, model.config.max_position_embeddings)  # longer has no positions
    eval_set = (
        TokenizedDataset(eval_data, tokenizer, max_len) if eval_data and eval_data.is_labelled else None
    )
    trainer = GuardedTrainer(
        model=model,
        args=training,
        data_collator=functools.partial(collate_batch, pad_token_id=tokenizer.pad_token_id or 0),
        train_dataset=TokenizedDataset(train_data, tokenizer, max_len),
        eval_dataset=eval_set,
        processing_class=tokenizer,
        compute_metrics=metric_function(eval_data.metric) if eval_set else None,
    )
    trainer.resume_hint = "continue with --resume_from_checkpoint latest"
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    results = train_results(trainer, output)
    if eval_set is not None:
        scores = trainer.evaluate()
        results.update({k: v for k, v in scores.items() if k == "eval_loss" or k.removeprefix("eval_") in
                        ("accuracy", eval_data.metric)})  # fmt: skip
        results["eval_samples"] = len(eval_set)
    if trainer.is_world_process_zero():
        save_teacher(trainer, args, results, train_data.name)
    return results


def save_teacher(trainer: GuardedTrainer, args: FinetuneArguments, results: dict, task: str) -> Path:
    """A folder ``teacher-server`` loads unchanged: weights, config with id2label, tokenizer; the
    checkpoints that resuming needed are deleted."""
    output_dir = Path(args.training.output_dir)
    trainer.model.config.finetuning_task = task
    trainer.save_model(str(output_dir))
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "training_args.json").write_text(
        json.dumps(args.to_dict(), indent=2, default=str) + "\n", encoding="utf-8"
    )
    for path in list_checkpoints(output_dir):
        shutil.rmtree(path)
    return output_dir
