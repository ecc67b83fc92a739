"""Eval loss against the embedding and head's learning rate, per method and lr of the rest.

Reads the `blockllm bench` records of `pretrain-lr` and `pretrain-cpu` under
benchmarks/results/ (issue 13's folders), keeps the finished fp32 runs of AdamW, GaLore and
BlockLLM that differ only in `--lr` and `--vocab-lr-scale` (not the patched library's runs,
nor the always-Adam or rest-lr-scale variants; BlockLLM at its reselection period of 200 only), and draws one line per method and lr of the
rest: the mean over seeds, with the seeds' range as error bars.

    .venv/bin/python benchmarks/plot_lr_sweep.py      # writes results/issue13-lr-sweep.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Flags that change more than the two learning rates: such runs are another method.
_OTHER_KNOBS = ("--always-adam", "--rest-lr-scale", "--rest", "--precision", "--vocab-rest")
_METHODS = ("adamw", "galore", "blockllm")


def _flag(flags: list[str], name: str, default: float) -> float:
    return float(flags[flags.index(name) + 1]) if name in flags else default


def _recipe(flags: list[str]) -> tuple[str, float]:
    trigger = flags[flags.index("--trigger") + 1] if "--trigger" in flags else "loss"
    return trigger, _flag(flags, "--patience", 0.0)


def load_points(results: Path) -> dict[tuple[str, float], dict[float, list[float]]]:
    """``{(optimizer, lr of the rest): {vocabulary lr: [eval loss per run]}}``."""
    files = [*results.glob("issue13-pretrain-lr-*/**/pretrain-lr.json"),
             *results.glob("issue13-pretrain-cpu-*/pretrain-cpu.json"),
             *results.glob("issue13-pretrain-rest-*/pretrain-rest.json")]  # fmt: skip
    points: dict[tuple[str, float], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[str, int, str]] = set()
    for path in files:
        if "patch" in path.parent.name:  # runs of a patched library, not of this one
            continue
        for record in json.loads(path.read_text()):
            flags = record.get("flags") or []
            if (
                record.get("status") != "ok"
                or record.get("optimizer") not in _METHODS
                or record.get("precision") != "fp32"
                or record.get("steps") != 400
                or any(knob in flags for knob in _OTHER_KNOBS)
                # BlockLLM's pretraining recipe (reselect every 200 steps) only: the older
                # interval-20 and loss-trigger runs are another recipe.
                or (record["optimizer"] == "blockllm" and _recipe(flags) != ("interval", 200.0))
            ):
                continue
            # The same run can sit in two folders (a suite's table and a rerun): count it once.
            key = (record["entry"], record["seed"], record["git_commit"])
            if key in seen:
                continue
            seen.add(key)
            lr = record["lr"]
            vocab_lr = lr * _flag(flags, "--vocab-lr-scale", 1.0)
            points[(record["optimizer"], lr)][vocab_lr].append(record["final_eval_loss"])
    return points


def plot(points: dict[tuple[str, float], dict[float, list[float]]], output: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for (optimizer, lr), by_vocab_lr in sorted(points.items()):
        xs = sorted(by_vocab_lr)
        means = [statistics.mean(by_vocab_lr[x]) for x in xs]
        low = [m - min(by_vocab_lr[x]) for m, x in zip(means, xs)]
        high = [max(by_vocab_lr[x]) - m for m, x in zip(means, xs)]
        seeds = max(len(v) for v in by_vocab_lr.values())
        ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3,
                    label=f"{optimizer}, rest at lr {lr:g} (up to {seeds} seeds)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate of the embedding and head")
    ax.set_ylabel("eval loss after 400 steps (lower is better)")
    ax.set_title("pretrain-lr: tiny Llama, 400 steps, fp32, this CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=RESULTS / "issue13-lr-sweep.png")
    args = parser.parse_args()
    points = load_points(args.results)
    if not points:
        raise SystemExit(f"no pretrain-lr records under {args.results}")
    plot(points, args.output)
    for (optimizer, lr), by_vocab_lr in sorted(points.items()):
        cells = ", ".join(
            f"{x:g}: {statistics.mean(v):.4f} (n={len(v)})" for x, v in sorted(by_vocab_lr.items())
        )
        print(f"{optimizer} lr {lr:g}: {cells}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
