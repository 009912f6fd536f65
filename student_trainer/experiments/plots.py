"""The report's figures (matplotlib, headless): Fig. 3, Fig. 6, accuracy vs teacher FLOPs, and the
same axes for budget-based against ratio-based selection."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from student_trainer.experiments.config import ExperimentConfig, PlotSpec
from student_trainer.experiments.layout import Layout


def draw_plots(
    config: ExperimentConfig, cells: dict[tuple[str, str], Any], layout: Layout
) -> list[tuple[str, Path]]:
    """Draw every plot of the config that has data; (title, PNG path) of each drawn."""
    import matplotlib

    matplotlib.use("Agg")
    drawn = []
    for index, spec in enumerate(config.plots):
        draw = {
            "ratio_curve": ratio_curve,
            "kl_weight": kl_weight,
            "accuracy_vs_flops": accuracy_vs_flops,
            "budget_vs_ratio": budget_vs_ratio,
        }[spec.kind]
        path = layout.results / f"fig{index + 1}_{spec.kind}.png"
        if draw(spec, config, cells, layout, path):
            drawn.append((spec.title, path))
    return drawn


def _new_axes(spec: PlotSpec, xlabel: str, ylabel: str, ncols: int = 1):  # noqa: ANN202 - matplotlib types
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    fig.suptitle(spec.title)
    for ax in axes[0]:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return fig, axes[0]


def _save(fig, path: Path) -> bool:  # noqa: ANN001
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _metric(config: ExperimentConfig, layout: Layout, task: str) -> str:
    path = layout.task_record(task)
    return json.loads(path.read_text())["metric"] if path.exists() else "accuracy"


def ratio_curve(spec: PlotSpec, config: ExperimentConfig, cells, layout: Layout, path: Path) -> bool:  # noqa: ANN001
    """Score vs r per strategy, ± 1 std band; the baseline (vanilla KD) as a dashed line."""
    task = spec.task or next(iter(config.tasks))
    fig, (ax,) = _new_axes(spec, "selection ratio r", f"{task} {_metric(config, layout, task)}")
    plotted = False
    for strategy in spec.methods:
        points = sorted(
            (float(m.args["selection_ratio"]), cells[(task, m.name)])
            for m in config.methods
            if m.args.get("data_selection") == strategy
            and "selection_ratio" in m.args  # not budget runs
            and (task, m.name) in cells
        )
        if not points:
            continue
        xs = [x for x, _ in points]
        means = [c.mean for _, c in points]
        stds = [c.std for _, c in points]
        ax.plot(xs, means, marker="o", label=strategy)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], alpha=0.15)  # fmt: skip
        plotted = True
    base = cells.get((task, spec.baseline)) if spec.baseline else None
    if base is not None:
        ax.axhline(base.mean, linestyle="--", color="black", label=f"{spec.baseline} (r = 1)")
    ax.legend()
    return _save(fig, path) if plotted else False


def kl_weight(spec: PlotSpec, config: ExperimentConfig, cells, layout: Layout, path: Path) -> bool:  # noqa: ANN001
    """The batch-mean KL weight per step, averaged over seeds, one line per task and method."""
    fig, (ax,) = _new_axes(spec, "training step", "mean KL-term weight (1 - u/U)")
    plotted = False
    for task in config.tasks:
        for method in spec.methods:
            traces = []
            for seed in config.seeds:
                trace_path = layout.run_results(task, method, seed) / "trace.json"
                if trace_path.exists():
                    trace = json.loads(trace_path.read_text())
                    if trace.get("w_kl"):
                        traces.append(trace)
            if not traces:
                continue
            steps = traces[0]["step"]
            length = min(len(t["w_kl"]) for t in traces)
            mean = [statistics.fmean(t["w_kl"][i] for t in traces) for i in range(length)]
            ax.plot(steps[:length], mean, label=f"{task} {method} (n={len(traces)})")
            plotted = True
    ax.legend()
    return _save(fig, path) if plotted else False


def accuracy_vs_flops(spec: PlotSpec, config: ExperimentConfig, cells, layout: Layout, path: Path) -> bool:  # noqa: ANN001
    """Every method's mean score against the teacher FLOPs it bought per instance, per task."""
    tasks = [t for t in config.tasks if any(k[0] == t for k in cells)]
    if not tasks:
        return False
    fig, axes = _new_axes(spec, "teacher GFLOPs per training instance", "score", ncols=len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        ax.set_title(f"{task} ({_metric(config, layout, task)})")
        for (cell_task, method), cell in sorted(cells.items()):
            if cell_task != task or cell.n == 0:
                continue
            x = statistics.fmean(cell.flops_per_instance) / 1e9
            ax.errorbar(x, cell.mean, yerr=cell.std, fmt="o", capsize=3)
            ax.annotate(method, (x, cell.mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    return _save(fig, path)


def budget_vs_ratio(spec: PlotSpec, config: ExperimentConfig, cells, layout: Layout, path: Path) -> bool:  # noqa: ANN001
    """Score against measured teacher FLOPs per instance: one line per strategy and kind of selection
    (solid: a teacher budget; dashed: a ratio), ± 1 std bars; ``baseline`` as a reference point."""
    from student_trainer.experiments.report import selection_series

    task = spec.task or next(iter(config.tasks))
    fig, (ax,) = _new_axes(
        spec, "teacher GFLOPs per training instance", f"{task} {_metric(config, layout, task)}"
    )
    series = selection_series(config, task, cells)
    for (strategy, kind), points in sorted(series.items()):
        if spec.methods and strategy not in spec.methods:
            continue
        xs, cells_ = [p[0] for p in points], [p[2] for p in points]
        ax.errorbar(xs, [c.mean for c in cells_], yerr=[c.std for c in cells_], marker="o", capsize=3,
                    linestyle="-" if kind == "budget" else "--", label=f"{strategy} ({kind})")  # fmt: skip
    base = cells.get((task, spec.baseline)) if spec.baseline else None
    if base is not None:
        ax.axhline(base.mean, linestyle=":", color="black", label=spec.baseline)
    ax.legend()
    return _save(fig, path) if series else False
