"""What a distill run tells humans and tools besides the ``Trainer``'s own logs: ``metrics.jsonl`` and
the closing summary paragraph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerState, TrainingArguments

from student_trainer.args.distill import DistillArguments
from student_trainer.train.metrics import BASELINE_MARGIN, above_majority_baseline


class MetricsWriter(TrainerCallback):
    """``metrics.jsonl``: the ``Trainer``'s logs, one JSON line each (``event`` train, eval or end), on the
    main process. A resumed run first drops what a killed run logged past its checkpoint."""

    def __init__(self, output_dir: Path, resumed_from: Path | None) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.resumed_from = resumed_from

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: Any, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        if self.resumed_from is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            step = int(self.resumed_from.name.rsplit("-", 1)[-1])
            self.path.write_text("".join(line + "\n" for line in self._lines_up_to(step)))

    def _lines_up_to(self, step: int) -> list[str]:
        """The log's records up to ``step``; a kill mid-write leaves a torn last line, dropped too."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record["step"] <= step:
                kept.append(line)
        return kept

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: Any,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        event = "train" if "loss" in logs else "eval" if any(k.startswith("eval_") for k in logs) else "end"
        with self.path.open("a") as handle:
            handle.write(json.dumps({"event": event, "step": state.global_step, **logs}) + "\n")


def gflops(value: float) -> str:
    return f"{value / 1e9:,.2f} GFLOPs"


def selection_amount(args: DistillArguments) -> str:
    """How much the data selection sends: the budget, or the ratio."""
    if args.teacher_budget is not None:
        return f"teacher budget {args.teacher_budget}"
    return f"r = {args.selection_ratio:g}{', exact budget' if args.exact_budget else ''}"


def ladder_text(results: dict[str, Any]) -> str:
    """`` over a < b < c`` for a ladder of teachers (by FLOPs per token), nothing for one teacher."""
    ladder = results.get("teacher_ladder") or []
    return f" over {' < '.join(ladder)}" if len(ladder) > 1 else ""


def summary_paragraph(args: DistillArguments, results: dict[str, Any]) -> str:
    """The one paragraph a human reads at the end of a run."""
    ledger = results["flops"]
    method = (
        "cross-entropy only (no KD)"
        if args.no_kd
        else f"teacher selection '{args.teacher_selection}'{ladder_text(results)}, "
        f"data selection '{args.data_selection}'"
        f" ({selection_amount(args)}),"
        f" supervision '{args.supervision}' ({args.kd_loss} loss)"
    )
    evaluation = results.get("eval") or {}
    scores = ", ".join(
        f"{k.removeprefix('eval_')} {v:.4f}" for k, v in evaluation.items() if k != "eval_loss"
    )
    text = (
        f"Distilled a {results['student_layers']}-layer student from {args.model_name_or_path} on "
        f"{results['task']} for {results['global_step']} steps ({results['epoch']:.2f} epochs, "
        f"{results['world_size']} process(es)) in {results['train_runtime_s']:.1f} s with {method}. "
    )
    text += f"Evaluation: {scores}. " if scores else "No evaluation data. "
    at_baseline = at_majority_baseline(results)
    text += baseline_sentence(results, at_baseline)
    if ledger["teacher_flops_saved_fraction"] is not None:
        text += savings_sentences(ledger, at_baseline)
    elif ledger.get("teacher_requests"):
        text += "The teachers' FLOPs are unknown (teachers behind other servers): see their tokens. "
    else:
        text += "No teacher was queried. "
    if ledger.get("teacher_store_hit_rate") is not None:
        text += (
            f"The store of teacher answers answered {ledger['teacher_store_hits']:,} of "
            f"{ledger['teacher_store_lookups']:,} rows ({100 * ledger['teacher_store_hit_rate']:.1f}%). "
        )
    unit = next(
        (u for u in ("flops", "calls", "tokens") if ledger.get(f"teacher_budget_{u}") is not None), None
    )
    if unit is not None:
        used = ledger["teacher_budget_used_fraction"]
        amount = gflops if unit == "flops" else lambda n: f"{n:,} {unit}"
        text += (
            f"Teacher budget {args.teacher_budget}: the rows sent cost "
            f"{amount(ledger[f'teacher_budget_spent_{unit}'])} "
            f"of the {amount(ledger[f'teacher_budget_{unit}'])} it allows"
            + (f" ({100 * used:.1f}% of it). " if used is not None else ". ")
        )
    text += f"Student training cost {gflops(ledger['student_flops'])}."
    return text


def savings_sentences(ledger: dict[str, Any], at_baseline: bool) -> str:
    """The teacher FLOPs saved, each part named: the method's choices first, then the service's share
    on the rows sent, then the whole bill against vanilla KD as the trainer would pad it."""
    service = ledger.get("teacher_flops_saved_by_service")
    if service is None:
        by_service = "The service was sent no rows. "
    else:
        change = f"{100 * abs(service):.1f}% {'less' if service >= 0 else 'more, for padding'}"
        by_service = (
            f"The service then computed {gflops(ledger['teacher_flops_spent'])} for them ({change}; "
            f"its output cache answered {ledger['teacher_cache_hits']:,} rows). "
        )
    return (
        f"Dynamic KD's choices saved {100 * ledger['teacher_flops_saved_by_method']:.1f}% of the teacher "
        f"FLOPs{', for a student that learned nothing usable' if at_baseline else ''}: the rows sent cost "
        f"{gflops(ledger['teacher_flops_requested'])} at their real lengths, where vanilla KD (every row to "
        f"every teacher) would cost {gflops(ledger['teacher_flops_vanilla_unpadded'])}. {by_service}"
        f"Against vanilla KD padded as the trainer collates its batches "
        f"({gflops(ledger['teacher_flops_vanilla'])}), the teachers' bill is "
        f"{100 * ledger['teacher_flops_saved_fraction']:.1f}% lower. "
    )


def at_majority_baseline(results: dict[str, Any]) -> bool:
    """Whether the student did not beat always predicting the majority label on the task's metric
    (False when there was no evaluation): ``not above_majority_baseline`` of ``results.json``."""
    baseline, evaluation = results.get("majority_baseline"), results.get("eval") or {}
    if not baseline or f"eval_{baseline['metric']}" not in evaluation:
        return False
    return not above_majority_baseline(evaluation, baseline)


def baseline_sentence(results: dict[str, Any], at_baseline: bool) -> str:
    """The majority-class baseline beside the student's score, so a FLOPs saving is read against
    what the student learned ("" without an evaluation)."""
    baseline = results.get("majority_baseline")
    if not baseline:
        return ""
    metric = baseline["metric"]
    scores = f"accuracy {baseline['eval_accuracy']:.4f}"
    if metric != "accuracy":
        scores += f", {metric} {baseline[f'eval_{metric}']:.4f}"
    text = f"Majority-class baseline of the evaluation set (always {baseline['label']!r}): {scores}. "
    if at_baseline:
        score, floor = results["eval"][f"eval_{metric}"], baseline[f"eval_{metric}"]
        where = "below" if score < floor else f"within {BASELINE_MARGIN} of"
        text += f"The student's {metric} {score:.4f} is {where} that baseline: it has not learned the task. "
    return text
