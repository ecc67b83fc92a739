"""Entries of `blockllm bench` compared over seeds, at the end and at every evaluation.

Reads one or more bench output folders (each holds the suite's ``SUITE.json`` records and either
``runs/RUN/metrics.jsonl`` or an ``eval_curves.jsonl`` of their evaluation lines), pairs every
entry's seeds with the reference entry's, and prints:

* the final eval loss per seed, mean +- sd, and the paired difference to the reference (mean +- sd
  over seeds, Student's t, and the relative difference of the means);
* the paired difference at every evaluation step the runs share, so that a lead that grows or
  shrinks over a run shows (the question of `pretrain-long`).

With ``--plot`` it draws the mean eval loss per entry against the step (the band: the lowest and
highest seed) and the paired difference to the reference; with ``--curves`` it writes the
evaluation lines of every run it read, which is all that needs to be kept of the run folders.

    .venv/bin/python benchmarks/seed_comparison.py OUT_S0 OUT_S1 --reference adamw-vocab-30 \
        --plot results/X/eval_vs_step.png --curves results/X/eval_curves.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES_FILE = "eval_curves.jsonl"


def load(folders: list[Path]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, dict[int, float]]]]:
    """``finals[entry][seed]`` and ``curves[entry][seed][step]``, eval losses of finished runs.

    Raises:
        ValueError: a folder holds no suite records, or two records of one entry and seed disagree.
    """
    finals: dict[str, dict[int, float]] = {}
    curves: dict[str, dict[int, dict[int, float]]] = {}
    for folder in folders:
        records = [r for path in sorted(folder.glob("*.json")) for r in _suite_records(path)]
        if not records:
            raise ValueError(f"{folder}: no `blockllm bench` suite records (SUITE.json)")
        lines = _eval_lines(folder)
        for record in records:
            if record.get("status") != "ok" or record.get("final_eval_loss") is None:
                continue
            entry, seed, loss = record["entry"], record["seed"], record["final_eval_loss"]
            known = finals.setdefault(entry, {}).get(seed)
            if known is not None and abs(known - loss) > 1e-6:
                raise ValueError(f"{entry} seed {seed}: two records disagree ({known} and {loss})")
            finals[entry][seed] = loss
            steps = {line["step"]: line["eval_loss"] for line in lines.get(record["method"], [])}
            curves.setdefault(entry, {})[seed] = steps
    return finals, curves


def _suite_records(path: Path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list) and all(isinstance(r, dict) and "entry" in r for r in data):
        return data
    return []  # another JSON file (a plot's table, an estimate): not a suite's records


def _eval_lines(folder: Path) -> dict[str, list[dict]]:
    """The evaluation lines of every run in ``folder``, by run name."""
    lines: dict[str, list[dict]] = {}
    for metrics in sorted(folder.glob("runs/*/metrics.jsonl")):
        for text in metrics.read_text(encoding="utf-8").splitlines():
            record = json.loads(text)
            if "eval_loss" in record:
                lines.setdefault(metrics.parent.name, []).append({"run": metrics.parent.name, **record})
    if not lines and (folder / CURVES_FILE).is_file():
        for text in (folder / CURVES_FILE).read_text(encoding="utf-8").splitlines():
            record = json.loads(text)
            lines.setdefault(record["run"], []).append(record)
    return lines


def paired(values: dict[int, float], reference: dict[int, float]) -> dict[str, float] | None:
    """The difference ``values - reference`` over their common seeds: mean, sd, t, relative."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    differences = [values[s] - reference[s] for s in seeds]
    mean = statistics.mean(differences)
    sd = statistics.stdev(differences) if len(seeds) > 1 else math.nan
    t = mean / (sd / math.sqrt(len(seeds))) if len(seeds) > 1 and sd > 0 else math.nan
    relative = statistics.mean(values[s] for s in seeds) / statistics.mean(reference[s] for s in seeds) - 1
    return {"seeds": len(seeds), "mean": mean, "sd": sd, "t": t, "relative": relative}


def difference_curve(curves: dict[int, dict[int, float]], reference: dict[int, dict[int, float]]) -> dict[int, list[float]]:
    """``{step: [entry - reference per common seed]}`` at the steps every common seed evaluated."""
    seeds = sorted(set(curves) & set(reference))
    if not seeds:
        return {}
    steps = set.intersection(*(set(curves[s]) & set(reference[s]) for s in seeds))
    return {step: [curves[s][step] - reference[s][step] for s in seeds] for step in sorted(steps)}


def report(finals, curves, reference: str) -> str:
    if reference not in finals:
        raise ValueError(f"no finished run of the reference entry {reference!r}; entries: {sorted(finals)}")
    out = ["final eval loss per seed; paired difference to " + reference]
    for entry, losses in sorted(finals.items(), key=lambda item: statistics.mean(item[1].values())):
        per_seed = "  ".join(f"s{seed} {loss:.4f}" for seed, loss in sorted(losses.items()))
        sd = statistics.stdev(losses.values()) if len(losses) > 1 else 0.0
        line = f"  {entry:45s} {per_seed}  mean {statistics.mean(losses.values()):.4f} +- {sd:.4f}"
        stats = paired(losses, finals[reference]) if entry != reference else None
        if stats:
            line += (f"  | {stats['mean']:+.4f} +- {stats['sd']:.4f} over {stats['seeds']} seeds, "
                     f"t = {stats['t']:.1f}, {100 * stats['relative']:+.2f} %")
        out.append(line)
    entries = [e for e in sorted(curves) if e != reference]
    table = {entry: difference_curve(curves[entry], curves.get(reference, {})) for entry in entries}
    steps = sorted(set().union(*(set(t) for t in table.values()))) if table else []
    if steps:
        out.append(f"\nmean paired difference to {reference} at each evaluation (seeds in brackets)")
        out.append("  step  " + "".join(f"{entry[:28]:>30s}" for entry in entries))
        for step in steps:
            cells = []
            for entry in entries:
                values = table[entry].get(step)
                cells.append(f"{statistics.mean(values):+.4f} [{len(values)}]" if values else "-")
            out.append(f"  {step:5d} " + "".join(f"{cell:>30s}" for cell in cells))
    return "\n".join(out)


def draw(curves, reference: str, output: Path, title: str) -> None:
    figure, (losses, gaps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry in sorted(curves):
        seeds = curves[entry]
        steps = sorted(set.intersection(*(set(c) for c in seeds.values()))) if seeds else []
        steps = [s for s in steps if s > 0]  # the loss at step 0 (about ln V) would flatten the rest
        if not steps:
            continue
        values = [[seeds[seed][step] for seed in seeds] for step in steps]
        line = losses.plot(steps, [statistics.mean(v) for v in values], label=f"{entry} ({len(seeds)} seeds)")
        losses.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=line[0].get_color(), alpha=0.2)
        if entry != reference:
            gap = difference_curve(seeds, curves[reference])
            gap_steps = [s for s in gap if s > 0]
            gaps.plot(gap_steps, [statistics.mean(gap[s]) for s in gap_steps], marker=".",
                      color=line[0].get_color(), label=entry)
    losses.set_xlabel("step")
    losses.set_ylabel("eval loss (mean over seeds; band: lowest to highest seed)")
    losses.set_yscale("log")
    gaps.axhline(0.0, color="black", linewidth=0.8)
    gaps.set_xlabel("step")
    gaps.set_ylabel(f"eval loss minus {reference}'s, same seed (mean)")
    for axis in (losses, gaps):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (--output-dir)")
    parser.add_argument("--reference", required=True, help="the entry the others are paired with")
    parser.add_argument("--plot", type=Path, help="draw the curves into this PNG")
    parser.add_argument("--title", default="eval loss over the run, paired by seed")
    parser.add_argument("--curves", type=Path, help=f"write every run's evaluation lines here ({CURVES_FILE})")
    args = parser.parse_args()
    finals, curves = load(args.folders)
    print(report(finals, curves, args.reference))
    if args.plot:
        draw(curves, args.reference, args.plot, args.title)
        print(f"wrote {args.plot}")
    if args.curves:
        lines = [line for folder in args.folders for run in _eval_lines(folder).values() for line in run]
        args.curves.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {args.curves} ({len(lines)} evaluations)")


if __name__ == "__main__":
    main()
