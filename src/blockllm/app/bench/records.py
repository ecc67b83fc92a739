"""Turn finished bench runs into records: one per method, comparable side by side.

Kept apart from the runner (:mod:`blockllm.app.bench.runner`) so that the arithmetic the results
rest on (the record's fields, the equal-time interpolation, the choice of the reference row, the
table) is plain functions of plain data, tested without starting any training.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from blockllm.app.training.memory import format_bytes


def method_record(
    label: str, optimizer: str, summary: dict[str, Any], wall_seconds: float
) -> dict[str, Any]:
    """One method's benchmark record from its run's ``summary.json``.

    Tensor bytes are the run's peaks counted from the live tensors. ``training_state_bytes`` is
    parameters + gradients + optimizer state + master weights (the issue's definition: what
    training holds in tensors besides activations), each at its own peak. ``training_memory_bytes``
    is the process's peak RSS less its RSS just before the first step.
    """
    memory = summary.get("memory", {})
    stats = summary.get("optimizer_stats") or {}
    final = summary.get("final_eval") or {}
    peak, baseline = memory.get("peak_rss_bytes"), memory.get("baseline_rss_bytes")
    params = memory.get("peak_params_bytes", 0)
    grads = memory.get("peak_grads_bytes", 0)
    state = memory.get("peak_optimizer_state_bytes", 0)
    masters = memory.get("peak_master_weights_bytes", 0)
    train_seconds = summary.get("train_seconds") or 0.0
    selection = stats.get("selection_seconds")
    return {
        "method": label,
        "optimizer": optimizer,
        "status": "ok",
        "steps": summary.get("steps"),
        "tokens": summary.get("tokens"),
        "peak_rss_bytes": peak,
        "peak_gpu_bytes": memory.get("peak_cuda_bytes"),  # torch.cuda.max_memory_allocated
        "baseline_rss_bytes": baseline,
        "training_memory_bytes": peak - baseline if peak and baseline else None,
        "training_state_bytes": params + grads + state + masters,
        "param_bytes": params,
        "grad_bytes": grads,
        "optimizer_state_bytes": state,
        "master_weight_bytes": masters,
        "tokens_per_s": summary.get("tokens_per_s"),
        "final_eval_loss": final.get("eval_loss"),
        "accuracy": final.get("eval_accuracy"),
        "initial_accuracy": (summary.get("initial_eval") or {}).get("eval_accuracy"),
        "eval_loss_at_equal_time": None,  # filled in by add_equal_time, across the methods
        "num_reselections": stats.get("num_reselections"),
        # Methods without the stat update every parameter (AdamW, GaLore, 8-bit AdamW).
        "trainable_fraction": stats.get("trainable_fraction", 1.0),
        "selection_time_fraction": (
            selection / train_seconds if selection is not None and train_seconds else None
        ),
        "train_seconds": train_seconds,
        "wall_seconds": round(wall_seconds, 2),
        "num_parameters": (summary.get("info") or {}).get("num_parameters"),
        "threads": summary.get("threads"),
        "precision": summary.get("precision"),
        "device": summary.get("device"),
    }


def eval_curve(
    summary: dict[str, Any], metrics: list[dict[str, Any]], key: str = "eval_loss"
) -> list[tuple[float, float]]:
    """``(training seconds, value)`` of every evaluation of a run, in time order.

    The evaluation before the first step (``--eval-at-start``) is the point at 0 s.
    """
    points: list[tuple[float, float]] = []
    initial = (summary.get("initial_eval") or {}).get(key)
    if initial is not None:
        points.append((0.0, float(initial)))
    for record in metrics:
        if key in record and "elapsed_s" in record:
            points.append((float(record["elapsed_s"]), float(record[key])))
    return sorted(points)


def value_at_time(points: list[tuple[float, float]], when: float) -> float | None:
    """The curve's value at ``when``, interpolated linearly between the two evaluations around it.

    None when ``when`` lies outside the evaluated range (before the first evaluation, or after
    the last): extrapolating a loss curve would invent a number.
    """
    if not points or not points[0][0] <= when <= points[-1][0]:
        return None
    times = [time for time, _ in points]
    index = bisect.bisect_left(times, when)
    if times[index] == when:
        return points[index][1]
    (t0, v0), (t1, v1) = points[index - 1], points[index]
    return v0 + (v1 - v0) * (when - t0) / (t1 - t0)


def add_equal_time(
    records: list[dict[str, Any]], curves: dict[str, dict[str, list[tuple[float, float]]]]
) -> float | None:
    """Fill ``eval_loss_at_equal_time`` (and ``accuracy_at_equal_time``) of the finished records.

    The common time T is the shortest training time (evaluation excluded) among the methods
    that finished: every one of them has trained at least that long, so each value is
    interpolated inside its own curve, and the fastest method's value is its final one. A
    method's training time is read off its last evaluation, which every run makes after its
    last step (``train_seconds`` in the summary is the same number, rounded differently).
    ``curves`` maps a record's method to ``{"eval_loss": points, "eval_accuracy": points}``.

    Returns:
        T in seconds, or None when no method finished.
    """
    done = [r for r in records if r.get("status") == "ok" and r.get("train_seconds")]
    if not done:
        return None

    def trained(record: dict[str, Any]) -> float:
        points = curves.get(record["method"], {}).get("eval_loss")
        return points[-1][0] if points else float(record["train_seconds"])

    when = min(trained(record) for record in done)
    for record in done:
        curve = curves.get(record["method"], {})
        record["equal_time_seconds"] = when
        record["eval_loss_at_equal_time"] = value_at_time(curve.get("eval_loss", []), when)
        if curve.get("eval_accuracy"):
            record["accuracy_at_equal_time"] = value_at_time(curve["eval_accuracy"], when)
    return when


def choose_baseline(
    records: list[dict[str, Any]], optimizer: str = "adamw"
) -> dict[str, Any] | None:
    """Mark and return the reference row: the best finished entry of ``optimizer``.

    Best is the highest accuracy when the runs report one, else the lowest final eval loss; so
    with an lr grid the ratios are against the tuned baseline, not an arbitrary grid point. Every
    finished record gets ``baseline`` (True for the chosen one only).
    """
    done = [r for r in records if r.get("status") == "ok"]
    candidates = [r for r in done if r.get("optimizer", r.get("method")) == optimizer]

    def badness(record: dict[str, Any]) -> float:
        if record.get("accuracy") is not None:
            return -float(record["accuracy"])
        loss = record.get("final_eval_loss")
        return float(loss) if loss is not None and math.isfinite(loss) else math.inf

    best = min(candidates, key=badness, default=None)  # min keeps the first of equals
    for record in done:
        record["baseline"] = record is best
    return best


# (record key, column title, kind): "bytes" and "speed" get a ratio to the baseline, "loss" and
# "accuracy" a difference.
_COLUMNS = (
    ("peak_rss_bytes", "peak RSS", "bytes"),
    ("peak_gpu_bytes", "peak GPU", "bytes"),
    ("training_memory_bytes", "training memory", "bytes"),
    ("training_state_bytes", "training state", "bytes"),
    ("param_bytes", "params", "bytes"),
    ("grad_bytes", "gradients", "bytes"),
    ("optimizer_state_bytes", "optimizer state", "bytes"),
    ("tokens_per_s", "tokens/s", "speed"),
    ("final_eval_loss", "eval loss", "loss"),
    ("eval_loss_at_equal_time", "eval loss at T", "loss"),
    ("accuracy", "accuracy", "accuracy"),
    ("num_reselections", "reselections", "count"),
    ("trainable_fraction", "trainable", "fraction"),
    ("selection_time_fraction", "selection time", "fraction"),
)


def seed_table(records: list[dict[str, Any]], baseline_optimizer: str = "adamw") -> str:
    """Mean and spread over seeds of each entry (records carry ``entry``, their label less
    ``-sSEED``), against the best entry of ``baseline_optimizer`` by mean.

    Eval loss (or accuracy) as mean, min-max and standard deviation over the seeds that
    finished; training state and tokens/s as the ratio of means to the baseline entry's.
    """
    done = [r for r in records if r.get("status") == "ok"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in done:
        groups.setdefault(record.get("entry", record["method"]), []).append(record)
    accuracy = any(r.get("accuracy") is not None for r in done)
    key = "accuracy" if accuracy else "final_eval_loss"

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    summary = {}
    for entry, runs in groups.items():
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        if not values:
            continue
        centre = mean(values)
        spread = (sum((v - centre) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
        summary[entry] = {
            "optimizer": runs[0].get("optimizer"), "values": values, "mean": centre,
            "sd": spread if len(values) > 1 else 0.0,
            "state": mean([float(r.get("training_state_bytes") or 0) for r in runs]),
            "speed": mean([float(r.get("tokens_per_s") or 0) for r in runs]),
        }  # fmt: skip
    reference = [s for s in summary.values() if s["optimizer"] == baseline_optimizer]
    best = None
    if reference:
        best = (max if accuracy else min)(reference, key=lambda s: s["mean"])
    title = "accuracy" if accuracy else "eval loss"
    lines = [
        f"| entry | seeds | {title}: mean | min-max | sd | vs reference | training state × "
        "| tokens/s × |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry, s in summary.items():
        versus = state = speed = "n/a"
        if best is not None:
            difference = s["mean"] - best["mean"]
            versus = f"{difference:+.4f}" + ("" if accuracy else f" ({difference / best['mean']:+.1%})")
            state = f"{s['state'] / best['state']:.2f}" if best["state"] else "n/a"
            speed = f"{s['speed'] / best['speed']:.2f}" if best["speed"] else "n/a"
        lines.append(
            f"| {entry}{' (reference)' if s is best else ''} | {len(s['values'])} | "
            f"{s['mean']:.4f} | {min(s['values']):.4f}-{max(s['values']):.4f} | {s['sd']:.4f} | "
            f"{versus} | {state} | {speed} |"
        )
    return "\n".join(lines)


def markdown_table(records: list[dict[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    """The finished methods in a table, ratios (×) or differences against ``baseline``.

    ``baseline`` defaults to the record marked ``baseline``, else the one named ``adamw``.
    Columns that no record fills (peak GPU on a CPU, accuracy when pretraining) are left out.
    """
    done = [record for record in records if record.get("status") == "ok"]
    if baseline is None:
        baseline = next((r for r in done if r.get("baseline")), None) or next(
            (r for r in done if r["method"] == "adamw"), None
        )
    columns = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in done)]
    header = ["method", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in done:
        cells = [
            record["method"] + (" (reference)" if record is baseline and len(done) > 1 else "")
        ]
        for key, _, kind in columns:
            cells.append(
                _cell(record.get(key), None if record is baseline else baseline, key, kind)
            )
        lines.append("| " + " | ".join(cells) + " |")
    for record in records:
        if record.get("status") != "ok":
            reason = " ".join(str(record.get("reason", "")).split())
            lines.append(f"\n{record['method']}: {record['status']} ({reason})")
    return "\n".join(lines)


def _cell(value: Any, base: dict[str, Any] | None, key: str, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "bytes":
        text = format_bytes(value)
    elif kind == "speed":
        text = f"{value:,.0f}"
    elif kind in ("loss", "accuracy", "fraction"):
        text = f"{value:.4f}" if kind != "fraction" else f"{value:.3f}"
    else:
        text = str(value)
    reference = base.get(key) if base is not None else None
    if kind in ("bytes", "speed") and reference:
        text += f" ({value / reference:.2f}×)"
    elif kind in ("loss", "accuracy") and reference is not None:
        text += f" ({value - reference:+.4f})"
    return text


__all__ = [
    "add_equal_time",
    "choose_baseline",
    "eval_curve",
    "markdown_table",
    "method_record",
    "value_at_time",
]
