"""``--dry_run``: the grid's runs, which are done, and what each will cost in FLOPs.

Estimates use the FLOPs model of ``shared/flops.py`` on the task's real token lengths (the
student's tokenizer, cut at ``max_seq_length``): vanilla KD sends every row of every epoch to
every teacher the method uses; data selection sends a fraction ``r`` of the rows (its real rows
are the most uncertain ones, whose lengths differ, so the ledger of a real run is the truth);
``hard`` sends each selected row to one teacher (an equal share to each); a ``teacher_budget``
spends at most the budget (a percentage: of vanilla KD's bill); training costs 3 × forward. A
prompted teacher reads each row inside its template: the row's length plus the template's tokens;
teacher-server computes only its label words' rows of the LM head, vLLM the whole vocabulary's.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Any

from shared.errors import UserError
from student_trainer.experiments.config import ExperimentConfig, Method
from student_trainer.experiments.layout import Layout, run_id
from student_trainer.experiments.models import resolve_model
from student_trainer.kd.budget import TeacherBudget

# Sizes of public checkpoints a dry run may name without having them on disk (the paper profile).
KNOWN_CONFIGS = {
    "bert-base-uncased": {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072},
    "bert-large-uncased": {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096},
}
# The tokenizer that measures lengths when the student's is not on disk: MiniLM-L6 ships the
# bert-base-uncased WordPiece vocabulary, so its lengths are BERT's.
FALLBACK_TOKENIZER = "minilm"


@cache
def model_config(name: str, num_layers: int | None, num_labels: int) -> Any:
    """The model's shape for the FLOPs model (layers cut to ``num_layers``): its config from disk,
    whatever its family, or a BERT of :data:`KNOWN_CONFIGS`."""
    if name in KNOWN_CONFIGS:
        sizes = dict(KNOWN_CONFIGS[name])
        if num_layers:
            sizes["num_hidden_layers"] = num_layers
        return SimpleNamespace(**sizes, num_labels=num_labels)
    from transformers import AutoConfig

    try:
        loaded = AutoConfig.from_pretrained(resolve_model(name), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of {name!r} for the estimate: {err}") from None
    loaded.num_labels = num_labels
    if num_layers:
        loaded.num_hidden_layers = num_layers
    return loaded


@cache
def prompt_tokens(model: str, prompt: str) -> int:
    """The tokens a prompted teacher's template adds to every row (its own tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), local_files_only=True)
    return len(tokenizer(prompt.format(text="", text_pair=""))["input_ids"])


@cache
def token_lengths(
    model: str, task: str, data_dir: str, max_samples: int | None, max_len: int
) -> tuple[tuple[int, ...], int]:
    """Token counts of the training rows, and the number of labels."""
    from transformers import AutoTokenizer

    from student_trainer.data.readers import load_task

    data = load_task(task, data_dir, "train", max_examples=max_samples)
    try:  # a dry run prices a grid offline: a hub id not on disk falls back at once, without retries
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(FALLBACK_TOKENIZER))
    pairs = [e.text_b for e in data.examples] if data.examples and data.examples[0].text_b else None
    enc = tokenizer([e.text_a for e in data.examples], pairs, truncation=True, max_length=max_len)
    return tuple(len(ids) for ids in enc["input_ids"]), len(data.label_names)


def estimate(config: ExperimentConfig, task: str, method: Method) -> dict[str, float]:
    """Teacher and student FLOPs of one run (see the module docstring for the assumptions)."""
    from shared.flops import encoder_forward_flops, next_token_shape

    options: dict[str, Any] = {**config.distill, **config.tasks[task], **method.args}
    max_len = int(options.get("max_seq_length", 128))
    lengths, num_labels = token_lengths(
        config.student.model, task, options["data_dir"], options.get("max_train_samples"), max_len
    )
    epochs = float(options.get("num_train_epochs", 3.0))
    if int(options.get("max_steps", -1)) > 0:  # as distill does: max_steps wins over epochs
        epochs = int(options["max_steps"]) * int(options.get("per_device_train_batch_size", 8)) / len(lengths)
    ratio = (
        float(options.get("selection_ratio", 1.0)) if options.get("data_selection", "none") != "none" else 1.0
    )
    roles = method.teacher_roles(tuple(config.teachers))
    share = 1 / len(roles) if options.get("teacher_selection") == "hard" else 1.0
    vanilla = 0.0
    for role in roles:
        spec = config.teachers[role]
        teacher_config = model_config(spec.model, spec.num_layers, num_labels)
        if config.engine == "vllm":  # asked for its next token: the LM head over the whole vocabulary
            teacher_config = next_token_shape(teacher_config)
        extra = prompt_tokens(spec.model, spec.prompted["prompt"]) if spec.prompted else 0
        vanilla += epochs * encoder_forward_flops(teacher_config, [n + extra for n in lengths])
    teacher = share * ratio * vanilla
    if options.get("teacher_budget") is not None:  # what the run may spend, at most
        budget = TeacherBudget.parse(str(options["teacher_budget"]))
        if budget.fraction is not None:
            teacher = float(budget.fraction * vanilla)
        elif budget.unit == "flops":
            teacher = float(budget.flops or 0)
        else:  # calls or tokens: that share of every row (or token) through every teacher, at most
            whole = len(roles) * epochs * (len(lengths) if budget.unit == "calls" else sum(lengths))
            teacher = min(1.0, (budget.flops or 0) / max(1, whole)) * vanilla
    student_config = model_config(config.student.model, config.student.num_layers, num_labels)
    student = 3 * epochs * encoder_forward_flops(student_config, list(lengths))
    return {"teacher": teacher, "student": student, "instances": epochs * len(lengths)}


def print_plan(config: ExperimentConfig, layout: Layout) -> None:
    runs = config.runs()
    print(f"experiment {config.name!r} (profile {config.profile}): {len(config.tasks)} task(s) x "
          f"{len(config.methods)} method(s) x {len(config.seeds)} seed(s) = {len(runs)} runs")  # fmt: skip
    print(f"results: {layout.results}   work: {layout.work}")
    print(f"{'run':<44} {'status':<8} {'teacher TFLOPs':>15} {'per instance GF':>16} {'student TFLOPs':>15}")
    totals = {"teacher": 0.0, "student": 0.0}
    done = 0
    for task, method, seed in runs:
        cost = estimate(config, task, method)
        status = "done" if layout.is_done(task, method, seed) else "pending"
        done += status == "done"
        totals["teacher"] += cost["teacher"]
        totals["student"] += cost["student"]
        print(
            f"{run_id(task, method.name, seed):<44} {status:<8} {cost['teacher'] / 1e12:15.2f} "
            f"{cost['teacher'] / cost['instances'] / 1e9:16.3f} {cost['student'] / 1e12:15.2f}"
        )
    print(
        f"total: {done}/{len(runs)} done; teachers {totals['teacher'] / 1e12:,.1f} TFLOPs, "
        f"students {totals['student'] / 1e12:,.1f} TFLOPs (before the service's cache)"
    )
