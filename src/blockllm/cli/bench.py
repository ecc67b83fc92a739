"""``blockllm bench``: every method of a suite side by side, each in its own process.

Each method runs as ``python -m blockllm pretrain --optimizer METHOD ...`` with the same model,
data, seed, steps and schedule, so that its peak RSS is its own. The corpus slice and tokenizer
are prepared once here first (as in ``blockllm demo``), so no child is charged for them. A method
whose peer package is missing is not started: its record says ``skipped`` with the install line.

Writes ``DIR/SUITE.json`` (one record per method, with the environment), ``DIR/SUITE.md`` (a
table with ratios to AdamW) and ``DIR/loss_vs_step.png``, ``DIR/loss_vs_time.png``,
``DIR/memory.png``; the run directories go to ``DIR/runs/METHOD``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blockllm.cli.common import (
    add_runtime_flags,
    prepare_tokenizer,
    require_empty_output_dir,
    resolve_cache_dir,
)
from blockllm.cli.demo import DemoSize
from blockllm.train.memory import format_bytes

BASELINE = "adamw"
SEED = 0


@dataclass(frozen=True)
class Suite:
    """The methods of one suite and the ``blockllm pretrain`` settings they share."""

    name: str
    description: str
    methods: tuple[str, ...]
    size: DemoSize


# Sized so that all eight methods, with their start-up, take about two minutes on two cores.
SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick",
        description="tiny preset, the smoke test of the whole comparison",
        methods=("adamw", "blockllm", "blockllm-random", "lisa", "badam", "galore", "lora",
                 "adamw-8bit"),
        size=DemoSize(
            steps=60, batch_size=8, seq_len=64, vocab_size=2048, max_chars=1_000_000,
            eval_every=20, eval_batches=4, lr=2e-3, patience=10,
        ),
    ),
}  # fmt: skip


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark BlockLLM against AdamW and its peers, each method in its own process",
        description="Run every method of a suite with the same model, data, seed and steps, "
        "each in its own process, then write SUITE.json, SUITE.md (ratios to AdamW) and plots.",
    )
    parser.add_argument("--suite", choices=tuple(SUITES), default="quick", help="(default: quick)")
    parser.add_argument(
        "--output-dir", metavar="DIR", required=True, help="where results go (new or empty)"
    )
    parser.add_argument(
        "--methods",
        metavar="A,B",
        default=None,
        help="comma-separated subset of the suite's methods (default: all of them)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help="override the suite's steps"
    )
    add_runtime_flags(parser.add_argument_group("runtime"))
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from blockllm.train.optimizers import OPTIMIZERS, missing_package
    from blockllm.train.plots import plot_loss_vs_step, plot_loss_vs_time, plot_memory
    from blockllm.train.report import load_run

    suite = SUITES[args.suite]
    methods = suite.methods
    if args.methods:
        methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
        unknown = [name for name in methods if name not in OPTIMIZERS]
        if unknown or not methods:
            listed = ", ".join(repr(name) for name in OPTIMIZERS)
            raise ValueError(f"Invalid methods: {args.methods!r} (choose from {listed})")
    size = suite.size
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"Invalid steps: {args.steps} (must be >= 1)")
        size = replace(size, steps=args.steps, eval_every=max(1, min(size.eval_every, args.steps)))
    output = Path(args.output_dir)
    require_empty_output_dir(output, "bench")
    cache_dir = resolve_cache_dir(args.cache_dir)
    started = time.perf_counter()
    print(
        f"blockllm bench --suite {suite.name}: {len(methods)} methods, {size.steps} steps of "
        f"{size.batch_size}x{size.seq_len} tokens on the tiny preset, each in its own process",
        flush=True,
    )
    prepare_tokenizer(size.max_chars, size.vocab_size, cache_dir)

    environment = collect_environment()
    (output / "runs").mkdir(parents=True)
    records: list[dict[str, Any]] = []
    runs = []
    for number, method in enumerate(methods, start=1):
        missing = missing_package(method)
        if missing is not None:
            pip_line = missing.splitlines()[-1]
            print(f"[{number}/{len(methods)}] {method}: skipped ({pip_line})", flush=True)
            records.append(
                {"method": method, "status": "skipped", "reason": missing, **environment}
            )
            continue
        print(f"[{number}/{len(methods)}] {method} ...", flush=True)
        run_dir = output / "runs" / method
        command = [
            sys.executable, "-m", "blockllm", "pretrain", "--model", "tiny", "--data", "stdlib",
            "--optimizer", method, "--output-dir", str(run_dir), "--seed", str(SEED),
            "--save-every", "0", "--no-tensorboard", "--cache-dir", str(cache_dir),
            "--progress", "off", "--log-level", "warning", *size.flags(),
        ]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        run_started = time.perf_counter()
        code, stderr = _run_child(command, output / "runs" / f"{method}.stderr")
        wall = time.perf_counter() - run_started
        if code != 0:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
            print(f"    failed: {last}", flush=True)
            records.append(
                {"method": method, "status": "failed", "reason": last, "exit_code": code,
                 **environment}
            )  # fmt: skip
            continue
        run = load_run(run_dir)
        run.name = method
        runs.append(run)
        records.append({**method_record(method, run.summary or {}, wall), **environment})

    (output / f"{suite.name}.json").write_text(json.dumps(records, indent=2) + "\n", "utf-8")
    if runs:
        plot_loss_vs_step(runs, output / "loss_vs_step.png")
        plot_loss_vs_time(runs, output / "loss_vs_time.png")
        plot_memory(runs, output / "memory.png")
    table = markdown_table(records)
    total = time.perf_counter() - started
    (output / f"{suite.name}.md").write_text(
        _markdown(suite, size, table, records, environment, total), encoding="utf-8"
    )
    print()
    print(table)
    print()
    print(f"bench finished in {total:.0f} s; wrote {output / (suite.name + '.json')} and .md")
    return 0


def _run_child(command: list[str], stderr_path: Path) -> tuple[int, str]:
    """Run one method to completion; its stderr is kept in ``stderr_path`` for failures."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        code = subprocess.call(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return code, stderr_path.read_text(encoding="utf-8", errors="replace")


def method_record(method: str, summary: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """One method's benchmark record from its run's ``summary.json``.

    Tensor bytes are the run's peaks counted from the live tensors; training memory is the
    process's peak RSS less its RSS just before the first step; training state is gradients,
    optimizer state and master weights together.
    """
    memory = summary.get("memory", {})
    stats = summary.get("optimizer_stats") or {}
    peak, baseline = memory.get("peak_rss_bytes"), memory.get("baseline_rss_bytes")
    grads = memory.get("peak_grads_bytes", 0)
    state = memory.get("peak_optimizer_state_bytes", 0)
    masters = memory.get("peak_master_weights_bytes", 0)
    train_seconds = summary.get("train_seconds") or 0.0
    selection = stats.get("selection_seconds")
    return {
        "method": method,
        "status": "ok",
        "steps": summary.get("steps"),
        "tokens": summary.get("tokens"),
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "training_memory_bytes": peak - baseline if peak and baseline else None,
        "training_state_bytes": grads + state + masters,
        "param_bytes": memory.get("peak_params_bytes"),
        "grad_bytes": grads,
        "optimizer_state_bytes": state,
        "master_weight_bytes": masters,
        "tokens_per_s": summary.get("tokens_per_s"),
        "final_eval_loss": (summary.get("final_eval") or {}).get("eval_loss"),
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


# (record key, column title, kind): "bytes" and "speed" get a ratio to AdamW, "loss" a difference.
_COLUMNS = (
    ("peak_rss_bytes", "peak RSS", "bytes"),
    ("training_memory_bytes", "training memory", "bytes"),
    ("training_state_bytes", "training state", "bytes"),
    ("grad_bytes", "gradients", "bytes"),
    ("optimizer_state_bytes", "optimizer state", "bytes"),
    ("tokens_per_s", "tokens/s", "speed"),
    ("final_eval_loss", "eval loss", "loss"),
    ("num_reselections", "reselections", "count"),
    ("trainable_fraction", "trainable", "fraction"),
    ("selection_time_fraction", "selection time", "fraction"),
)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The finished methods in a table, ratios (×) or differences against AdamW in parentheses."""
    done = [record for record in records if record.get("status") == "ok"]
    base = next((record for record in done if record["method"] == BASELINE), None)
    header = ["method", *(title for _, title, _ in _COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in done:
        cells = [record["method"]]
        for key, _, kind in _COLUMNS:
            cells.append(_cell(record.get(key), None if record is base else base, key, kind))
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
    elif kind == "loss":
        text = f"{value:.4f}"
    elif kind == "fraction":
        text = f"{value:.3f}"
    else:
        text = str(value)
    reference = base.get(key) if base is not None else None
    if kind in ("bytes", "speed") and reference:
        text += f" ({value / reference:.2f}×)"
    elif kind == "loss" and reference is not None:
        text += f" ({value - reference:+.4f})"
    return text


def collect_environment() -> dict[str, Any]:
    """What the numbers depend on: torch, the CPU, threads, seed and the code's commit."""
    import torch

    from blockllm import __version__

    return {
        "torch_version": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "seed": SEED,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "blockllm_version": __version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out where blockllm's sources live, read from ``.git`` (no git needed).

    Returns None outside a git checkout (an installed wheel).
    """
    here = (start or Path(__file__)).resolve()
    for folder in (here, *here.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (folder / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text(encoding="utf-8").strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            for base in (git, _common_dir(git)):
                if (base / ref).is_file():
                    return (base / ref).read_text(encoding="utf-8").strip()
                packed = base / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text(encoding="utf-8").splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
        except OSError:
            return None
        return None
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    if common.is_file():
        return (git / common.read_text(encoding="utf-8").strip()).resolve()
    return git


def _markdown(
    suite: Suite,
    size: DemoSize,
    table: str,
    records: list[dict[str, Any]],
    environment: dict[str, Any],
    total: float,
) -> str:
    threads = next((r.get("threads") for r in records if r.get("threads")), None)
    params = next((r.get("num_parameters") for r in records if r.get("num_parameters")), 0) or 0
    return f"""# blockllm bench --suite {suite.name}

{suite.description}: tiny Llama preset ({params / 1e6:.2f}M parameters, vocab {size.vocab_size}),
pretrained from scratch on the first {size.max_chars:,} characters of the Python standard library,
{size.steps} steps of {size.batch_size} x {size.seq_len} tokens, lr {size.lr} (warmup 10 %, cosine
to 10 %), patience {size.patience} (BlockLLM's trigger, LISA's and BAdam's switch interval), seed
{SEED}, fp32. Each method ran in its own process. Ratios (×) and eval-loss differences are against
AdamW. Training memory is peak RSS less the RSS just before the first step; training state is
gradients + optimizer state + master weights, counted from tensors.

{table}

Whole bench: {total:.0f} s. torch {environment["torch_version"]}, {environment["cpu"]},
{environment["cpu_count"]} cores, {threads} threads per run, commit {environment["git_commit"]}.

![loss vs step](loss_vs_step.png) ![loss vs time](loss_vs_time.png) ![memory](memory.png)
"""


__all__ = ["SUITES", "Suite", "add_bench_parser", "git_commit", "markdown_table", "method_record"]
