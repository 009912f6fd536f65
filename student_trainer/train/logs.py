"""What a distill run tells humans and tools: ``metrics.jsonl`` (+ TensorBoard), progress lines, the
closing summary paragraph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from student_trainer.args.distill import DistillArguments
from student_trainer.kd.ledger import FlopsLedger
from student_trainer.train.metrics import BASELINE_MARGIN, above_majority_baseline


class MetricsLog:
    """``metrics.jsonl`` (one line per step and per evaluation) + TensorBoard when installed."""

    def __init__(self, output_dir: Path, resume_step: int | None, enabled: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # drop what a killed run logged past its last checkpoint
            self.path.write_text("".join(line + "\n" for line in self._lines_up_to(resume_step)))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(output_dir / "runs"))

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

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tensorboard.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class Reporter:
    """Rank 0's voice: the metrics log, the progress bar and the averaged progress lines."""

    def __init__(
        self, log: MetricsLog, total_steps: int, initial_step: int, logging_steps: int, disable: bool
    ):
        self.log = log
        self.logging_steps = logging_steps
        self.total_steps = total_steps
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="distill", disable=disable)
        self.window: list[dict[str, float]] = []  # step records since the last progress line

    def train_step(
        self, record: dict[str, Any], parts: dict[str, float], learning_rate: float, ledger: FlopsLedger
    ) -> None:
        """Log one step; every ``logging_steps`` print the mean since the last line."""
        self.log.write(record)
        self.progress.update(1)
        if not self.log.enabled:  # only rank 0 prints, so only rank 0 keeps the window
            return
        self.window.append(parts)
        step = record["step"]
        if step % self.logging_steps == 0:
            mean = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
            self.window.clear()
            self.progress.write(
                f"step {step}/{self.total_steps} epoch {record['epoch']:.2f} | "
                + progress_line(mean, learning_rate, ledger)
            )

    def evaluation(self, step: int, scores: dict[str, float]) -> None:
        self.log.write({"event": "eval", "step": step, **scores})
        self.progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def close(self) -> None:
        self.log.close()


def gflops(value: float) -> str:
    return f"{value / 1e9:,.2f} GFLOPs"


def progress_line(mean: dict[str, float], learning_rate: float, ledger: FlopsLedger) -> str:
    saved = ledger.method_saved_fraction
    return (
        f"loss {mean['loss']:.4f} (ce {mean['ce']:.4f} kd {mean['kd']:.4f} pt {mean['pt']:.4f}) | "
        f"lr {learning_rate:.2e} | teacher wait {mean['teacher_seconds']:.3f} s/step | "
        f"teachers {gflops(ledger.teacher_flops)}"
        + (f" ({100 * saved:.1f}% saved by dynamic KD's choices)" if saved is not None else "")
    )


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
