"""``blockllm demo``: AdamW and BlockLLM side by side on the tiny preset, in a few minutes on a CPU.

Each method runs in its own subprocess (``python -m blockllm pretrain ...``) so that its peak RSS
is its own, with the same data, seed, steps and learning-rate schedule. The corpus slice and the
tokenizer are prepared once in this process first, so neither child pays for (or is measured
with) tokenizer training. The comparison goes to the terminal, ``DIR/demo.md`` and
``DIR/demo.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm.app.cli.common import add_runtime_flags, resolve_cache_dir
from blockllm.app.training.run_errors import STOP_SIGNALS
from blockllm.errors import BlockLLMError

METHODS = ("adamw", "blockllm")
#: Without a terminal (CI logs, ``| tee``), the seconds between two status lines of a child.
STATUS_EVERY_S = 10.0


class DemoRunError(BlockLLMError, RuntimeError):
    """One of the demo's training subprocesses failed."""


@dataclass(frozen=True)
class DemoSize:
    """The shared settings of both runs (flags of ``blockllm pretrain``)."""

    steps: int
    batch_size: int
    seq_len: int
    vocab_size: int
    max_chars: int
    eval_every: int
    eval_batches: int
    lr: float
    patience: int

    def flags(self) -> list[str]:
        return [
            "--max-steps", str(self.steps), "--batch-size", str(self.batch_size),
            "--seq-len", str(self.seq_len), "--vocab-size", str(self.vocab_size),
            "--max-chars", str(self.max_chars), "--eval-every", str(self.eval_every),
            "--eval-batches", str(self.eval_batches), "--lr", str(self.lr),
            "--patience", str(self.patience),
        ]  # fmt: skip


# Sized on a 2-core CPU (see docs/cli.md for the measurements): ~4k tokens/s for AdamW, faster for
# BlockLLM, so both runs, their start-up and evaluation take about 3.5 minutes on an idle machine
# (proportionally longer on a busy one).
FULL = DemoSize(
    steps=200, batch_size=16, seq_len=128, vocab_size=8192, max_chars=3_000_000,
    eval_every=50, eval_batches=8, lr=2e-3, patience=20,
)  # fmt: skip
# A smoke test of the whole pipeline in seconds (tests, CI).
QUICK = DemoSize(
    steps=6, batch_size=4, seq_len=32, vocab_size=512, max_chars=200_000,
    eval_every=3, eval_batches=2, lr=2e-3, patience=2,
)  # fmt: skip


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="AdamW vs BlockLLM on the tiny preset, side by side (a few minutes on a CPU)",
        description="Pretrain the tiny Llama preset on the Python standard library with AdamW and "
        "with BlockLLM, each in its own process, then print and save a comparison "
        "(peak memory, optimizer-state and gradient bytes, tokens/s, eval loss).",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        default=None,
        help="where the two runs, demo.md and demo.png go (default: runs/demo-<date>-<time>)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps per method (default: {FULL.steps})"
    )
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="BlockLLM sparsity (default: 0.9)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a {QUICK.steps}-step smoke run of the whole demo"
    )
    add_runtime_flags(parser.add_argument_group("runtime"))
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from blockllm.app.bench.plots import plot_demo
    from blockllm.app.bench.report import comparison_table, load_run
    from blockllm.app.bench.runner import prepare_tokenizer, require_empty_output_dir

    size = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"Invalid steps: {args.steps} (must be >= 1)")
        size = DemoSize(**{**size.__dict__, "steps": args.steps})
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"Invalid sparsity: {args.sparsity} (must be in [0, 1))")
    output = (
        Path(args.output_dir)
        if args.output_dir
        else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    )
    require_empty_output_dir(output, "demo")
    cache_dir = resolve_cache_dir(args.cache_dir)
    started = time.perf_counter()

    print(
        f"blockllm demo: pretraining the tiny Llama preset on the Python standard library, "
        f"{size.steps} steps of {size.batch_size}x{size.seq_len} tokens, AdamW vs BlockLLM "
        f"(sparsity {args.sparsity}), each in its own process",
        flush=True,
    )
    print(
        "preparing the corpus slice and the tokenizer (cached after the first run) ...", flush=True
    )
    prepare_tokenizer(size.max_chars, size.vocab_size, cache_dir)

    # On a terminal each child draws its own progress bar. Piped, a bar is noise and the
    # children's log lines are hidden (they run at --log-level warning, so that their set-up
    # chatter does not bury the table), which left minutes without a line: this process then
    # prints a status line of its own from each child's metrics.jsonl instead.
    mode = progress_mode(args.progress)
    durations = {}
    for number, method in enumerate(METHODS, start=1):
        print(f"[{number}/{len(METHODS)}] {method} ...", flush=True)
        command = [
            sys.executable, "-m", "blockllm", "pretrain", "--model", "tiny", "--data", "stdlib",
            "--optimizer", method, "--output-dir", str(output / method), "--seed", "0",
            "--sparsity", str(args.sparsity), "--save-every", "0", "--cache-dir", str(cache_dir),
            "--progress", "bar" if mode == "bar" else "off", "--log-level", "warning",
            *size.flags(),
        ]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        run_started = time.perf_counter()
        status = StatusLines(method, output / method, size.steps) if mode == "log" else None
        code = _run_child(command, status)
        durations[method] = time.perf_counter() - run_started
        if code != 0:
            raise DemoRunError(
                f"the {method} run failed with exit code {code}; its messages are above"
            )
        if mode != "off":
            print(f"    {method}: finished in {durations[method]:.0f} s", flush=True)

    runs = [load_run(output / method) for method in METHODS]
    table = comparison_table(runs)
    verdict = _verdict(runs[0].headline(), runs[1].headline())
    plot_demo(runs, output / "demo.png")
    total = time.perf_counter() - started
    (output / "demo.md").write_text(
        _markdown(table, verdict, size, args, durations, total, runs), encoding="utf-8"
    )
    print()
    print(table)
    print()
    print(verdict)
    print()
    print(f"demo finished in {total:.0f} s; wrote {output / 'demo.md'} and {output / 'demo.png'}")
    return 0


def progress_mode(requested: str) -> str:
    """``bar`` (each child's own), ``log`` (status lines from here) or ``off``; ``auto`` picks the
    bar on a terminal and the status lines otherwise."""
    if requested == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return requested


class StatusLines:
    """Prints ``    adamw: step 60/200 | loss 5.4321 | 4,100 tok/s | rss 900 MB | 35 s``.

    Called every :data:`STATUS_EVERY_S` seconds while a child runs; reads the newest line of the
    child's ``metrics.jsonl`` (the file is flushed after every line) and prints when the step
    moved, so a long evaluation does not repeat the same line.

    Args:
        label: The method, shown first.
        run_dir: The child's ``--output-dir``.
        total: The child's ``--max-steps``.
    """

    def __init__(self, label: str, run_dir: Path, total: int) -> None:
        self.label = label
        self.path = run_dir / "metrics.jsonl"
        self.total = total
        self.started = time.perf_counter()
        self._shown: int | None = None

    def __call__(self) -> None:
        from blockllm.app.training.progress import describe

        seconds = time.perf_counter() - self.started
        record = _newest_record(self.path)
        if record is None:
            if self._shown is None:  # once: the child is loading data and model
                print(f"    {self.label}: setting up ({seconds:.0f} s)", flush=True)
                self._shown = 0
            return
        if record["step"] == self._shown:
            return
        self._shown = record["step"]
        print(
            f"    {self.label}: step {record['step']}/{self.total} | {describe(record)} | "
            f"{seconds:.0f} s",
            flush=True,
        )


def _newest_record(path: Path) -> dict[str, Any] | None:
    """The last complete line of a ``metrics.jsonl`` that may be half-way through a write."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written right now
        if isinstance(record, dict) and {"step", "loss", "tokens_per_s", "peak_rss_mb"} <= set(
            record
        ):
            return record
    return None


def _run_child(command: list[str], status: Callable[[], None] | None = None) -> int:
    """Run a child to completion; on Ctrl-C let it checkpoint and exit before re-raising.

    A terminal's Ctrl-C reaches the whole process group, so the child already got SIGINT and is
    finishing its step; killing it (what ``subprocess.call`` does) would lose that work. SIGTERM
    and SIGHUP sent to this process alone are passed on as SIGTERM: a closed terminal sends
    SIGHUP to the child as well, and two different signals still mean "checkpoint and stop",
    where a second SIGHUP would abort the child at once.

    Args:
        command: The child's command line.
        status: Called every :data:`STATUS_EVERY_S` seconds while the child runs.
    """
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)

    def forward(signum: int, frame: Any) -> None:
        process.send_signal(signal.SIGTERM)

    forwarded = [signum for signum in STOP_SIGNALS if signum != signal.SIGINT]
    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        while True:
            try:
                return process.wait(timeout=STATUS_EVERY_S if status is not None else None)
            except subprocess.TimeoutExpired:
                assert status is not None
                status()
    except KeyboardInterrupt:
        process.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _verdict(adamw: dict[str, Any], blockllm: dict[str, Any]) -> str:
    """One sentence with the headline ratios, worded from the measured numbers."""

    def ratio(key: str) -> str:
        if not adamw.get(key) or blockllm.get(key) is None:
            return "n/a"
        return f"{blockllm[key] / adamw[key]:.2f}x"

    where = "n/a"
    if adamw.get("eval_loss") is not None and blockllm.get("eval_loss") is not None:
        gap = blockllm["eval_loss"] - adamw["eval_loss"]
        where = f"{abs(gap):.2f} nats {'above' if gap > 0 else 'below'} AdamW's"
    return (
        f"BlockLLM held {ratio('optimizer_state_bytes')} the optimizer state and "
        f"{ratio('grads_bytes')} the gradient bytes of AdamW, processed {ratio('tokens_per_s')} "
        f"the tokens per second, and after the same number of steps its eval loss was {where}."
    )


def _markdown(
    table: str,
    verdict: str,
    size: DemoSize,
    args: argparse.Namespace,
    durations: dict[str, float],
    total: float,
    runs: list[Any],
) -> str:
    import torch

    from blockllm import __version__

    info = (runs[0].summary or {}).get("info", {})
    rows = "\n".join(
        f"- {method}: {seconds:.0f} s wall (start-up, training, evaluation)"
        for method, seconds in durations.items()
    )
    return f"""# blockllm demo: AdamW vs BlockLLM

Tiny Llama preset ({info.get("num_parameters", 0) / 1e6:.2f}M parameters, vocab {info.get("vocab_size")}),
pretrained from scratch on the first {size.max_chars:,} characters of the Python standard library,
{size.steps} steps of {size.batch_size} x {size.seq_len} tokens, lr {size.lr} (warmup 10 %, cosine to 10 %),
seed 0. BlockLLM: sparsity {args.sparsity}, patience {size.patience}. Each method ran in its own process.
Ratios in parentheses are against AdamW; eval loss differences are absolute.

{table}

{verdict}

Peak RSS includes the Python interpreter, torch and transformers (about 0.4 GB before any model);
the optimizer-state and gradient columns are exact byte counts of those tensors.

{rows}
- whole demo: {total:.0f} s

Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()},
torch {torch.__version__}, blockllm {__version__}.

![demo](demo.png)
"""


__all__ = [
    "FULL",
    "QUICK",
    "STATUS_EVERY_S",
    "DemoSize",
    "StatusLines",
    "add_demo_parser",
    "progress_mode",
    "run_demo",
]
