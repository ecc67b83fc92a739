"""Read finished (or running) run directories and compare them in one Markdown table.

A run directory holds ``config.json``, ``metrics.jsonl`` and, once finished, ``summary.json``.
The table reports what users compare methods by: peak memory (process RSS, and exact bytes of
gradients and optimizer state), throughput, and the final held-out metric, each non-baseline
value followed by its ratio to the AdamW run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm.app.training.memory import format_bytes
from blockllm.app.training.metrics import METRICS_FILE, read_metrics
from blockllm.app.training.rundir import CONFIG_FILE, SUMMARY_FILE

_MB = 1e6


@dataclass
class RunRecord:
    """One run directory's files.

    Attributes:
        name: A short label (the directory name).
        path: The directory.
        config: ``config.json`` as a dict.
        metrics: The ``metrics.jsonl`` records.
        summary: ``summary.json``, or None while the run has not finished.
    """

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optimizer", "?"))

    def last(self, key: str) -> Any:
        """The latest value of ``key`` in the metrics, or None."""
        for record in reversed(self.metrics):
            if key in record:
                return record[key]
        return None

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of every record holding both ``x`` and ``key``."""
        pairs = [(r[x], r[key]) for r in self.metrics if key in r and x in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def headline(self) -> dict[str, Any]:
        """The comparison numbers, from ``summary.json`` when there is one, else the metrics."""
        summary = self.summary or {}
        memory = summary.get("memory", {})
        final = summary.get("final_eval") or {}

        def pick(summary_value: Any, metric: str, scale: float = 1.0) -> Any:
            if summary_value is not None:
                return summary_value
            value = self.last(metric)
            return None if value is None else value * scale

        tokens, elapsed = self.last("tokens"), self.last("elapsed_s")
        fallback_speed = tokens / elapsed if tokens and elapsed else None
        stats = summary.get("optimizer_stats") or {}
        return {
            "steps": summary.get("steps", self.last("step")),
            "peak_rss_bytes": pick(memory.get("peak_rss_bytes"), "peak_rss_mb", _MB),
            "peak_cuda_bytes": pick(memory.get("peak_cuda_bytes"), "peak_cuda_mb", _MB),
            "optimizer_state_bytes": pick(
                memory.get("peak_optimizer_state_bytes"), "peak_optimizer_state_mb", _MB
            ),
            "grads_bytes": pick(memory.get("peak_grads_bytes"), "peak_grads_mb", _MB),
            "tokens_per_s": summary.get("tokens_per_s", fallback_speed),
            "eval_loss": final.get("eval_loss", self.last("eval_loss")),
            "eval_ppl": final.get("eval_ppl", self.last("eval_ppl")),
            "eval_accuracy": final.get("eval_accuracy", self.last("eval_accuracy")),
            "num_reselections": stats.get("num_reselections", self.last("num_reselections")),
        }


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run: its ``config.json`` and ``metrics.jsonl``."""
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def find_runs(path: str | Path) -> list[Path]:
    """``path`` when it is a run directory, else every run directory below it, sorted.

    A folder of runs is what ``blockllm demo`` (``DIR/adamw``, ``DIR/blockllm``) and
    ``blockllm bench`` (``DIR/runs/LABEL``) write, and what users keep under ``runs/``.

    Raises:
        FileNotFoundError: ``path`` is no run directory and holds none.
    """
    path = Path(path).expanduser()
    if is_run_dir(path):
        return [path]
    found = (
        sorted(config.parent for config in path.rglob(CONFIG_FILE) if is_run_dir(config.parent))
        if path.is_dir()
        else []
    )
    if not found:
        raise FileNotFoundError(
            f"{path} is not a blockllm run directory (it needs {CONFIG_FILE} and {METRICS_FILE}) "
            "and holds none below it"
        )
    return found


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory.

    Raises:
        FileNotFoundError: ``path`` is not a blockllm run directory.
        ValueError: its files are not valid JSON.
    """
    path = Path(path).expanduser()
    if not is_run_dir(path):
        raise FileNotFoundError(
            f"{path} is not a blockllm run directory (it needs {CONFIG_FILE} and {METRICS_FILE})"
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        summary_path = path / SUMMARY_FILE
        summary = (
            json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        )
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: a JSON file is damaged ({exc})") from exc
    return RunRecord(
        name=path.resolve().name,
        path=path,
        config=config,
        metrics=read_metrics(path),
        summary=summary,
    )


def comparison_table(runs: list[RunRecord], *, baseline: str = "adamw") -> str:
    """A Markdown table of :meth:`RunRecord.headline`, with ratios to the first ``baseline`` run."""
    base = next((run for run in runs if run.optimizer == baseline), None)
    base_values = base.headline() if base is not None else None
    use_cuda = any(run.headline()["peak_cuda_bytes"] for run in runs)
    memory_key = "peak_cuda_bytes" if use_cuda else "peak_rss_bytes"
    has_accuracy = any(run.headline()["eval_accuracy"] is not None for run in runs)
    metric_key, metric_title = (
        ("eval_accuracy", "eval accuracy") if has_accuracy else ("eval_ppl", "eval ppl")
    )
    header = [
        "run", "optimizer", "steps", "peak CUDA" if use_cuda else "peak RSS", "optimizer state",
        "gradients", "tokens/s", "eval loss", metric_title, "reselections",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        values = run.headline()
        ref = base_values if run is not base else None

        speed = values["tokens_per_s"]
        cells = [
            run.name,
            run.optimizer,
            str(values["steps"]),
            _ratio(values, ref, memory_key, format_bytes(values[memory_key])),
            _ratio(
                values, ref, "optimizer_state_bytes", format_bytes(values["optimizer_state_bytes"])
            ),
            _ratio(values, ref, "grads_bytes", format_bytes(values["grads_bytes"])),
            _ratio(values, ref, "tokens_per_s", f"{speed:,.0f}" if speed is not None else "n/a"),
            _delta(values, ref, "eval_loss", 4),
            _delta(values, ref, metric_key, 4 if metric_key == "eval_accuracy" else 2),
            "n/a" if values["num_reselections"] is None else str(values["num_reselections"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(values: dict[str, Any], ref: dict[str, Any] | None, key: str, formatted: str) -> str:
    """``formatted`` followed by ``(value / baseline×)`` when there is a baseline value."""
    if ref is None or not ref.get(key) or values.get(key) is None:
        return formatted
    return f"{formatted} ({values[key] / ref[key]:.2f}×)"


def _delta(values: dict[str, Any], ref: dict[str, Any] | None, key: str, digits: int) -> str:
    """The value, followed by its signed difference to the baseline when there is one."""
    if values.get(key) is None:
        return "n/a"
    text = f"{values[key]:.{digits}f}"
    if ref is not None and ref.get(key) is not None and math.isfinite(values[key]):
        text += f" ({values[key] - ref[key]:+.{digits}f})"
    return text


__all__ = ["RunRecord", "comparison_table", "find_runs", "is_run_dir", "load_run"]
