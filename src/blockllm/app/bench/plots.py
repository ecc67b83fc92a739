"""PNG plots of one or several runs: loss against steps and wall time, memory, selection events.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) rather than pyplot,
so no global backend is switched and nothing needs a display: this works on headless servers and
inside user programs that use matplotlib themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from blockllm.app.bench.report import RunRecord

logger = logging.getLogger(__name__)

_MB = 1e6
# Category colours stay clear of the per-run colours (C0, C1, ...) used by the other panels.
_CATEGORIES = (
    ("params", "parameters", "#7f7f7f"),
    ("grads", "gradients", "#bcbd22"),
    ("optimizer_state", "optimizer state", "#9467bd"),
    ("master_weights", "master weights", "#8c564b"),
)


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "Plotting needs the package 'matplotlib', install it with:\npip install matplotlib"
        ) from exc
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential moving average, debiased for the first points."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def _color(index: int, count: int) -> Any:
    """Run ``index``'s colour: matplotlib's ten defaults, or twenty distinct ones for a bench suite
    with more runs (the default cycle would give two runs one colour)."""
    if count <= 10:
        return f"C{index}"
    from matplotlib import colormaps

    return colormaps["tab20"](index % 20)


def _loss_axes(axes: Any, runs: list[RunRecord], x: str, xlabel: str) -> None:
    for index, run in enumerate(runs):
        color = _color(index, len(runs))
        xs, ys = run.series("loss", x)
        if xs:
            axes.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
            axes.plot(xs, _smooth(ys), color=color, label=f"{run.name} train")
        xs, ys = run.series("eval_loss", x)
        if xs:
            axes.plot(xs, ys, color=color, marker="o", linestyle="--", label=f"{run.name} eval")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _memory_axes(tensor_axes: Any, process_axes: Any, runs: list[RunRecord]) -> None:
    names = [run.name for run in runs]
    width = 0.8 / len(_CATEGORIES)
    for offset, (key, label, color) in enumerate(_CATEGORIES):
        values = []
        for run in runs:
            memory = (run.summary or {}).get("memory", {})
            value = memory.get(f"peak_{key}_bytes")
            if value is None:
                value = (run.last(f"peak_{key}_mb") or 0.0) * _MB
            values.append(value / _MB)
        positions = [i + (offset - (len(_CATEGORIES) - 1) / 2) * width for i in range(len(runs))]
        tensor_axes.bar(positions, values, width=width, label=label, color=color)
    tensor_axes.set_xticks(range(len(runs)), names)
    tensor_axes.set_ylabel("MB (peak, counted from tensors)")
    tensor_axes.set_title("tensor memory by category")
    tensor_axes.legend(fontsize="small")
    tensor_axes.grid(axis="y", alpha=0.3)

    headlines = [run.headline() for run in runs]
    use_cuda = any(h["peak_cuda_bytes"] for h in headlines)
    key = "peak_cuda_bytes" if use_cuda else "peak_rss_bytes"
    values = [(h[key] or 0) / _MB for h in headlines]
    colors = [_color(i, len(runs)) for i in range(len(runs))]
    bars = process_axes.bar(range(len(runs)), values, color=colors)
    process_axes.bar_label(bars, fmt="%.0f", fontsize="small")
    process_axes.set_xticks(range(len(runs)), names)
    process_axes.set_ylabel("MB")
    process_axes.set_title("peak CUDA allocation" if use_cuda else "peak process RSS")
    process_axes.grid(axis="y", alpha=0.3)
    if len(runs) > 4:  # a bench suite's labels would overlap side by side
        for axes in (tensor_axes, process_axes):
            axes.tick_params(axis="x", labelrotation=45, labelsize="small")
            for label in axes.get_xticklabels():
                label.set_horizontalalignment("right")  # the label ends under its bar


def selection_steps(run: RunRecord) -> list[int]:
    """Steps after which the selection changed (``num_reselections`` went up)."""
    steps, previous = [], 0
    for record in run.metrics:
        count = record.get("num_reselections")
        if count is not None and count > previous:
            steps.append(int(record["step"]))
            previous = count
    return steps


def plot_loss_vs_step(runs: list[RunRecord], path: Path) -> Path:
    figure, (axes,) = _figure(8, 5)
    _loss_axes(axes, runs, "step", "optimizer step")
    axes.set_title("loss vs steps")
    figure.savefig(path, dpi=120)
    return path


def plot_loss_vs_time(runs: list[RunRecord], path: Path) -> Path:
    figure, (axes,) = _figure(8, 5)
    _loss_axes(axes, runs, "elapsed_s", "training time (s, evaluation excluded)")
    axes.set_title("loss vs wall time")
    figure.savefig(path, dpi=120)
    return path


def plot_memory(runs: list[RunRecord], path: Path) -> Path:
    figure, (tensor_axes, process_axes) = _figure(11, 4.5, columns=2)
    _memory_axes(tensor_axes, process_axes, runs)
    figure.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_step(runs: list[RunRecord], path: Path) -> Path:
    """Held-out accuracy at every evaluation (finetuning); step 0 is the untrained model."""
    figure, (axes,) = _figure(8, 5)
    for index, run in enumerate(runs):
        xs, ys = run.series("eval_accuracy")
        initial = ((run.summary or {}).get("initial_eval") or {}).get("eval_accuracy")
        if initial is not None:
            xs, ys = [0, *xs], [initial, *ys]
        if xs:
            axes.plot(xs, ys, color=_color(index, len(runs)), marker="o", label=run.name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out accuracy")
    axes.set_title("accuracy vs steps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_selection_events(runs: list[RunRecord], path: Path) -> Path:
    """Training loss with a vertical line at every reselection, one panel per run."""
    figure, axes_list = _figure(6 * len(runs), 4, columns=len(runs))
    for index, (axes, run) in enumerate(zip(axes_list, runs, strict=True)):
        xs, ys = run.series("loss")
        axes.plot(xs, ys, color=f"C{index}", alpha=0.25, linewidth=0.8)
        axes.plot(xs, _smooth(ys), color=f"C{index}", label="train loss")
        events = selection_steps(run)
        for number, step in enumerate(events):
            axes.axvline(
                step,
                color="k",
                alpha=0.35,
                linewidth=0.8,
                label="reselection" if number == 0 else None,
            )
        has_selection = run.last("num_reselections") is not None
        detail = f"{len(events)} reselections" if has_selection else "no block selection"
        axes.set_title(f"{run.name}: {detail}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_demo(runs: list[RunRecord], path: Path) -> Path:
    """The demo's one picture: loss curves (steps and time) and memory side by side."""
    figure, axes = _figure(17, 4.5, columns=4)
    _loss_axes(axes[0], runs, "step", "optimizer step")
    axes[0].set_title("loss vs steps")
    _loss_axes(axes[1], runs, "elapsed_s", "training time (s)")
    axes[1].set_title("loss vs wall time")
    _memory_axes(axes[2], axes[3], runs)
    figure.savefig(path, dpi=110)
    return path


def write_report_plots(runs: list[RunRecord], output_dir: Path) -> list[Path]:
    """Write the four report PNGs into ``output_dir`` and return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_loss_vs_step(runs, output_dir / "loss_vs_step.png"),
        plot_loss_vs_time(runs, output_dir / "loss_vs_time.png"),
        plot_memory(runs, output_dir / "memory.png"),
        plot_selection_events(runs, output_dir / "selection_events.png"),
    ]


__all__ = [
    "plot_accuracy_vs_step",
    "plot_demo",
    "plot_loss_vs_step",
    "plot_loss_vs_time",
    "plot_memory",
    "plot_selection_events",
    "selection_steps",
    "write_report_plots",
]
