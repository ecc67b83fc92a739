"""Eval loss against training state: every pretraining method at its tuned learning rates.

Reads the `blockllm bench` records under benchmarks/results/ of the two CPU pretraining models
(tiny: `pretrain-lr`, 400 steps; llama-20m: `pretrain-cpu-20m`, 200 steps), keeps each method's
tuned point (the entries of `benchmarks/README.md`'s seed tables) and draws, per model, the mean
eval loss over seeds (error bars: one standard deviation) against the training state as a
multiple of AdamW's (weights, gradients at their largest, optimizer state, masters). Each seed
is counted once; reruns of a seed (several folders hold the same seed) must agree within 1e-3.
Prints the table it draws.

    .venv/bin/python benchmarks/plot_tuned_points.py     # writes results/tuned-points.{png,json}
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Per model: the suite file its records are in, the steps they ran, and the tuned entries
# (label -> legend), each method at its best point of the lr grids.
MODELS = {
    "tiny (400 steps)": ("pretrain-lr.json", 400, {
        "adamw-vocab-30": "AdamW, vocabulary at 30x lr",
        "galore-lr8e-3-vocab-3.75": "GaLore at its best (lr 8e-3, vocabulary 3.75x)",
        "blockllm-lr5e-4-vocab-20-factored-fb2-0.99": "BlockLLM (lr 5e-4, vocabulary 20x)",
    }),
    "llama-20m (200 steps)": ("pretrain-cpu-20m.json", 200, {
        "adamw-vocab-30": "AdamW, vocabulary at 30x lr",
        "galore-vocab-3": "GaLore at its best (lr 1e-2, vocabulary 3x)",
        "blockllm-lr5e-4-vocab-20-factored-fb2-0.99": "BlockLLM (lr 5e-4, vocabulary 20x)",
    }),
}  # fmt: skip
_SEED_SUFFIX = re.compile(r"-s\d+$")


def load(results: Path, suite_file: str, steps: int, entries: dict[str, str]) -> dict[str, dict]:
    """``{entry: {"losses": {seed: loss}, "state": {seed: bytes}}}`` from the entries' records.

    Raises:
        ValueError: two records of one entry and seed disagree by more than 1e-3.
    """
    found: dict[str, dict] = {entry: {"losses": {}, "state": {}} for entry in entries}
    for path in sorted(results.rglob(suite_file)):
        for record in json.loads(path.read_text()):
            entry = _SEED_SUFFIX.sub("", record.get("method", ""))
            if entry not in found or record.get("status") != "ok" or record.get("steps") != steps:
                continue
            if record.get("precision") != "fp32":
                continue
            losses, seed = found[entry]["losses"], record["seed"]
            loss = record["final_eval_loss"]
            if seed in losses and abs(losses[seed] - loss) > 1e-3:
                raise ValueError(f"{entry} seed {seed}: {losses[seed]} and {loss} ({path})")
            losses.setdefault(seed, loss)
            found[entry]["state"].setdefault(seed, record["training_state_bytes"])
    return found


def summarize(found: dict[str, dict], entries: dict[str, str]) -> list[dict]:
    """One row per entry with seeds: mean, sd, seeds and the state relative to AdamW's."""
    if not found["adamw-vocab-30"]["state"]:
        raise ValueError("no AdamW record (adamw-vocab-30) to take the training state against")
    reference = statistics.mean(found["adamw-vocab-30"]["state"].values())
    rows = []
    for entry, legend in entries.items():
        losses = list(found[entry]["losses"].values())
        if not losses:
            continue
        rows.append({
            "entry": entry,
            "legend": legend,
            "seeds": len(losses),
            "mean": statistics.mean(losses),
            "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "state_mb": statistics.mean(found[entry]["state"].values()) / 1e6,
            "state_vs_adamw": statistics.mean(found[entry]["state"].values()) / reference,
        })  # fmt: skip
    return rows


def draw(tables: dict[str, list[dict]], output: Path) -> None:
    colors = {"adamw": "tab:blue", "galore": "tab:orange", "blockllm": "tab:green"}
    figure, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5))
    for axis, (model, rows) in zip(axes, tables.items()):
        for row in rows:
            color = colors[row["entry"].split("-")[0]]
            axis.errorbar(row["state_vs_adamw"], row["mean"], yerr=row["sd"], fmt="o",
                          color=color, capsize=4, label=f"{row['legend']}, {row['seeds']} seeds")  # fmt: skip
        axis.set_title(model)
        axis.set_xlabel("training state, x AdamW's (weights, gradients, optimizer state)")
        axis.set_ylabel("eval loss (mean +- sd over seeds; lower is better)")
        axis.set_xlim(0, 1.1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    figure.suptitle("Each method at its tuned learning rates, CPU pretraining from scratch")
    figure.tight_layout()
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=RESULTS / "tuned-points.png")
    args = parser.parse_args()
    tables = {}
    for model, (suite_file, steps, entries) in MODELS.items():
        tables[model] = summarize(load(args.results, suite_file, steps, entries), entries)
        print(model)
        for row in tables[model]:
            print(f"  {row['entry']:45s} {row['seeds']:2d} seeds  {row['mean']:.4f} +- "
                  f"{row['sd']:.4f}  state {row['state_mb']:6.1f} MB ({row['state_vs_adamw']:.2f}x)")  # fmt: skip
    draw(tables, args.output)
    args.output.with_suffix(".json").write_text(json.dumps(tables, indent=2) + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
