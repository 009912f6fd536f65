"""`student-trainer distill`: a run of :class:`~student_trainer.train.trainer.DynamicKDTrainer` from the
command line.

Set up (output folder, data, student, teachers with their answer store), ``trainer.train()``, the
final evaluation, then what the run leaves besides its checkpoints: the student (``save_pretrained``),
``results.json``, ``summary.txt`` and ``metrics.jsonl`` (the ``Trainer``'s logs, written by
:class:`~student_trainer.train.logs.MetricsWriter`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, set_seed
from transformers.utils import logging as hf_logging

from shared.errors import UserError
from shared.modeling import load_sequence_classifier
from shared.provenance import made_with
from student_trainer.args.distill import DistillArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tokenized import TokenizedDataset
from student_trainer.train.checkpoint import prepare_output_dir
from student_trainer.train.evaluate import majority_baseline, metric_function
from student_trainer.train.guarded import train_results
from student_trainer.train.logs import MetricsWriter, summary_paragraph
from student_trainer.train.metrics import BASELINE_MARGIN, above_majority_baseline
from student_trainer.train.setup import make_clients
from student_trainer.train.student import reset_classifier
from student_trainer.train.trainer import DynamicKDTrainer


def distill(args: DistillArguments) -> dict[str, Any]:
    """Run a whole distillation; returns what ``results.json`` holds."""
    hf_logging.disable_progress_bar()
    training = args.training
    checkpoint = prepare_output_dir(training)
    train_data, eval_data = load_train_and_eval_from(args)
    model = load_sequence_classifier(
        args.model_name_or_path, label_names=train_data.label_names, num_layers=args.num_layers
    )
    set_seed(training.seed)  # the new head is drawn the same whatever from_pretrained consumed
    reset_classifier(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {args.model_name_or_path!r}: {err}") from err
    max_len = min(args.max_seq_length, model.config.max_position_embeddings)
    eval_set = (
        TokenizedDataset(eval_data, tokenizer, max_len) if eval_data and eval_data.is_labelled else None
    )
    trainer = DynamicKDTrainer(
        model=model,
        args=training,
        kd=args.kd,
        teachers=make_clients(args, training.device),
        teacher_specs=args.teachers,
        api_key_env=args.api_key_env,
        teacher_ready_timeout=args.teacher_ready_timeout,
        train_dataset=TokenizedDataset(train_data, tokenizer, max_len),
        eval_dataset=eval_set,
        processing_class=tokenizer,
        compute_metrics=metric_function(eval_data.metric) if eval_set else None,
        callbacks=[MetricsWriter(Path(training.output_dir), checkpoint)],
    )
    trainer.resume_hint = "continue with --resume_from_checkpoint latest"
    try:
        shorter = [i.max_seq_length for r, i in trainer.teachers.infos.items() if r not in trainer.text_roles]
        if min([max_len, *shorter]) < max_len:  # a teacher sent ids reads no more than its own limit
            trainer.train_dataset = TokenizedDataset(train_data, tokenizer, min(shorter))
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        last_eval = final_evaluation(trainer, eval_data.metric if eval_set else None)
        results = {**train_results(trainer, output), **run_results(args, trainer, train_data.name, last_eval)}
        results.update(baseline_check(train_data, eval_data, last_eval))
        if trainer.is_world_process_zero():
            write_results(args, trainer, results)
        return results
    finally:
        trainer.end()


def final_evaluation(trainer: DynamicKDTrainer, metric: str | None) -> dict[str, float]:
    """The loss and the task's metric on the evaluation set (nothing without one); an evaluation the
    ``Trainer`` ran at the last step already is not run again."""
    if metric is None:
        return {}
    last = next((log for log in reversed(trainer.state.log_history) if "eval_loss" in log), None)
    done = last is not None and last["step"] == trainer.state.global_step
    scores = last if done else trainer.evaluate()
    return {k: float(v) for k, v in scores.items() if k == "eval_loss" or k.removeprefix("eval_") in
            ("accuracy", metric)}  # fmt: skip


def run_results(
    args: DistillArguments, trainer: DynamicKDTrainer, task: str, last_eval: dict
) -> dict[str, Any]:
    """What ``results.json`` holds besides :func:`~student_trainer.train.guarded.train_results`."""
    ledger, kd = trainer.ledger, trainer.kd
    return {
        "task": task,
        "student_layers": int(trainer.student.config.num_hidden_layers),
        "world_size": trainer.args.world_size,
        "teacher_time_s": trainer.teacher_time_s,
        "eval": last_eval,
        "flops": {**ledger.summary(), **trainer.budget_so_far()},
        "teacher_ladder": list(kd.teacher_roles),
        "teachers": {
            role: {"spec": args.teachers[role], **asdict(info)}
            for role, info in trainer.teachers.infos.items()
        },
        "args": args.to_dict(),
        "made_with": made_with(),
    }


def baseline_check(train_data: Any, eval_data: Any, last_eval: dict[str, float]) -> dict[str, Any]:
    """The majority-class baseline of the evaluation set and whether the student beat it on the task's
    metric (:func:`above_majority_baseline`; None, None without an evaluation)."""
    if not last_eval or eval_data is None:
        return {"majority_baseline": None, "above_majority_baseline": None}
    baseline = majority_baseline(
        [e.label for e in train_data.examples],
        [e.label for e in eval_data.examples],
        eval_data.metric,
        train_data.label_names,
    )
    return {
        "majority_baseline": baseline,
        "above_majority_baseline": above_majority_baseline(last_eval, baseline),
    }


def write_results(args: DistillArguments, trainer: DynamicKDTrainer, results: dict[str, Any]) -> None:
    """The student, its tokenizer, ``results.json`` and the summary paragraph (printed and in
    ``summary.txt``)."""
    output_dir = Path(trainer.args.output_dir)
    trainer.student.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    summary = summary_paragraph(args, results)
    (output_dir / "summary.txt").write_text(summary + "\n")
    print(summary)
    if results["above_majority_baseline"] is False:
        print(baseline_warning(results), file=sys.stderr)


def baseline_warning(results: dict[str, Any]) -> str:
    baseline = results["majority_baseline"]
    key = f"eval_{baseline['metric']}"
    return (
        f"WARNING: the student's {baseline['metric']} {results['eval'][key]:.4f} is not above the "
        f"majority-class baseline {baseline[key]:.4f} by more than {BASELINE_MARGIN} "
        f"(always predicting {baseline['label']!r}): it has not "
        "learned the task (more steps, a higher learning rate, or check the data)"
    )
