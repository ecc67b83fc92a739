"""``blockllm report DIR...``: plots and a comparison table for one or several runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"


def add_report_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot and compare finished or running runs",
        description="Plot loss against steps and wall time, memory by category and selection "
        "events for one or several run directories, and print a comparison table "
        "(ratios against the first AdamW run).",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="DIR",
        help="run directories (--output-dir of pretrain/finetune), or folders holding runs "
        "(a demo's or bench's output, runs/): every run below them is read",
    )
    parser.add_argument(
        "--output-dir",
        metavar="OUT",
        default=None,
        help="where the PNGs and report.md go (default: DIR/report for one DIR, "
        "runs/report-DATE-TIME for several)",
    )
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from blockllm.app.bench.plots import write_report_plots
    from blockllm.app.bench.report import comparison_table, find_runs, load_run

    runs = []
    for given in args.runs:
        for path in find_runs(given):
            run = load_run(path)
            if path != Path(given).expanduser():  # found inside a folder: name it from there
                run.name = path.relative_to(Path(given).expanduser()).as_posix()
            runs.append(run)
    names = [run.name for run in runs]
    for index, run in enumerate(runs):
        if names.count(run.name) > 1:  # two runs named "blockllm" in different parents
            run.name = f"{run.path.resolve().parent.name}/{run.name}#{index}"
    if args.output_dir:
        output = Path(args.output_dir)
    elif len(args.runs) == 1:
        # Beside what it reports on: a run's or a folder's own report/ (ignored by report's
        # search, as it holds no config.json).
        output = Path(args.runs[0]).expanduser() / "report"
    else:
        # Not the current directory (it may be a git checkout): runs/, where runs, demos and
        # benches go by default and which .gitignore covers, in a folder of its own.
        output = Path("runs") / time.strftime("report-%Y%m%d-%H%M%S")
    paths = write_report_plots(runs, output)
    table = comparison_table(runs)
    listing = "\n".join(f"![{path.stem}]({path.name})" for path in paths)
    (output / REPORT_FILE).write_text(
        f"# blockllm report\n\n{table}\n\n{listing}\n", encoding="utf-8"
    )
    print(table)
    print()
    for path in [*paths, output / REPORT_FILE]:
        print(f"wrote {path}")
    return 0


__all__ = ["add_report_parser", "run_report"]
