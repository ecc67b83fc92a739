"""``blockllm bench``: the flags, and the call into the runner (:mod:`blockllm.app.bench.runner`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blockllm.app.bench.suites import SUITES
from blockllm.app.cli.common import add_runtime_flags, resolve_cache_dir
from blockllm.app.cli.demo import StatusLines


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark BlockLLM against AdamW and its peers, each method in its own process",
        description="Run every method of a suite with the same model, data, seed and steps, "
        "each in its own process, then write SUITE.json, SUITE.md (ratios to the best AdamW "
        "entry) and plots. Suites: "
        + "; ".join(f"{suite.name}: {suite.description}" for suite in SUITES.values()),
    )
    parser.add_argument("--suite", choices=tuple(SUITES), default="quick", help="(default: quick)")
    parser.add_argument(
        "--output-dir", metavar="DIR", required=True, help="where results go (new or empty)"
    )
    parser.add_argument(
        "--methods",
        metavar="A,B",
        default=None,
        help="comma-separated labels of the suite's entries, or optimizer names (adamw picks "
        "every AdamW entry; a registered optimizer outside the suite runs with its flags) "
        "(default: all of them)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="override the suite's steps"
    )
    parser.add_argument(
        "--seeds",
        metavar="A,B",
        default=None,
        help="run every method once per seed (model init and data order) and report the mean "
        "and spread over seeds, e.g. 0,1,2 (default: seed 0 once)",
    )
    add_runtime_flags(parser.add_argument_group("runtime"))
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from blockllm.app.bench.runner import run_bench

    methods = None
    if args.methods is not None:
        methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            raise ValueError(f"Invalid seeds: {args.seeds!r} (expected integers, e.g. 0,1,2)") from None
        if not seeds or min(seeds) < 0:
            raise ValueError(f"Invalid seeds: {args.seeds!r} (expected integers >= 0, e.g. 0,1,2)")
    run_bench(
        args.suite,
        Path(args.output_dir),
        cache_dir=resolve_cache_dir(args.cache_dir),
        methods=methods,
        steps=args.steps,
        threads=args.threads,
        seeds=seeds,
        status=None if args.progress == "off" else StatusLines,
    )
    return 0


__all__ = ["add_bench_parser", "run_bench_command"]
