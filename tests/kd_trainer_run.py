"""A `DynamicKDTrainer` on the tests' tiny models: built by the tests, or run as a script (under
``torchrun`` too): ``python tests/kd_trainer_run.py JSON`` with ``{"workspace": {...}, "output_dir": ...,
"kd": {...}, "training": {...}}``; rank 0 writes ``OUTPUT_DIR/run.json`` (world size, ledger totals)
and the student (with its projections) to ``OUTPUT_DIR/final``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer, TrainingArguments

from shared.modeling import load_sequence_classifier
from student_trainer import DynamicKDTrainer, KDConfig
from student_trainer.data.loading import load_train_and_eval
from student_trainer.data.tokenized import TokenizedDataset

# dropout, random selection, the exact-budget carry, projections, epochs of 5 batches: all must replay
RESUMABLE = KDConfig(
    teacher_selection="hard",
    supervision="uncertainty",
    data_selection="random",
    selection_ratio=0.5,
    exact_budget=True,
)


def make_trainer(
    workspace: dict[str, Path],
    output_dir: Path,
    kd: KDConfig = RESUMABLE,
    teachers: dict | None = None,
    **training,
) -> DynamicKDTrainer:
    files = {"train_file": workspace["train"], "validation_file": workspace.get("eval")}
    data, evaluation = load_train_and_eval(**files)
    tokenizer = AutoTokenizer.from_pretrained(workspace["student"])
    model = load_sequence_classifier(workspace["student"], label_names=data.label_names, num_layers=2)
    options = {
        "per_device_train_batch_size": 8,
        "max_steps": 12,
        "learning_rate": 1e-3,
        "warmup_steps": 0.2,  # a fraction of the steps
        "save_steps": 4,
        "logging_steps": 1,
        "seed": 7,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        **training,
    }
    return DynamicKDTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(output_dir), **options),
        kd=kd,
        teachers=teachers or {role: f"local:{workspace[role]}" for role in ("small", "large")},
        train_dataset=TokenizedDataset(data, tokenizer, 64),
        eval_dataset=TokenizedDataset(evaluation, tokenizer, 64) if evaluation else None,
        processing_class=tokenizer,
    )


def main(spec: dict) -> None:
    output = Path(spec["output_dir"])
    workspace = {key: Path(path) for key, path in spec["workspace"].items()}
    kd = KDConfig(**spec["kd"])
    teachers = {role: f"local:{workspace[role]}" for role in spec["teachers"]}
    trainer = make_trainer(workspace, output, kd, teachers, **spec["training"])
    trainer.train()
    trainer.save_model(str(output / "final"))
    if trainer.is_world_process_zero():
        run = {"world_size": trainer.args.world_size, "ledger": trainer.ledger.totals}
        (output / "run.json").write_text(json.dumps(run))
    trainer.end()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
