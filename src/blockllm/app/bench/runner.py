"""The benchmark runner behind ``blockllm bench``: every method of a suite side by side, each
in its own process.

Each entry of a suite (:mod:`blockllm.app.bench.suites`) runs as ``python -m blockllm pretrain``
(or ``finetune``) ``--optimizer NAME`` with the suite's shared flags and its own, so that its
peak RSS is its own. Whatever every run needs once (the corpus slice and tokenizer, the Gemma
conversion) is prepared here first, so no child is charged for it. A method whose peer package
is missing (or whose optimizer is not registered) is not started, and a child that fails is not
fatal: either way its record says ``skipped`` or ``failed`` and why.

Writes ``DIR/SUITE.json`` (one record per method, with the environment; rewritten after every
method, so an interrupted bench keeps what finished), ``DIR/SUITE.md`` (a table with ratios to
the best AdamW entry) and ``DIR/loss_vs_step.png``, ``DIR/loss_vs_time.png``, ``DIR/memory.png``
(and ``DIR/accuracy_vs_step.png`` when the runs report accuracy); the run directories go to
``DIR/runs/LABEL``. Children never write checkpoints (``--save-every -1``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockllm.app.bench.records import (
    add_equal_time,
    choose_baseline,
    eval_curve,
    markdown_table,
    method_record,
    seed_table,
)
from blockllm.app.bench.suites import SUITES, MethodEntry, Suite, select_entries
from blockllm.app.training.run_errors import RunDirError

SEED = 0


def run_bench(
    suite_name: str,
    output: Path,
    *,
    cache_dir: Path,
    methods: Sequence[str] | None = None,
    steps: int | None = None,
    threads: int | None = None,
    seeds: Sequence[int] | None = None,
    status: Callable[[str, Path, int], Callable[[], None]] | None = None,
) -> None:
    """Run the suite ``suite_name`` into ``output``, one child process per method (and seed).

    Args:
        suite_name: A key of :data:`~blockllm.app.bench.suites.SUITES`.
        output: The results directory (new or empty).
        cache_dir: The tokenizer and model cache shared by the children.
        methods: Labels of the suite's entries or optimizer names (see
            :func:`~blockllm.app.bench.suites.select_entries`); None runs every entry.
        steps: Overrides the suite's number of steps.
        threads: ``--threads`` of every child (None: torch's choice).
        seeds: Run every entry once per seed (model init, data order), labelled
            ``LABEL-sSEED``; the report then adds the mean and spread over seeds. None: seed
            :data:`SEED` once, under the entry's own label.
        status: ``status(label, run_dir, steps)`` gives the callable to call every
            :data:`STATUS_EVERY_S` seconds while that child runs (the command line's status
            lines; the children's own output goes to their stderr files). None: nothing
            between a run's start and end.

    Raises:
        ValueError: an unknown method or a bad number of steps.
        RunDirError: ``output`` holds something already.
    """
    from blockllm.app.bench.report import load_run
    from blockllm.app.methods import OPTIMIZERS

    suite = SUITES[suite_name]
    entries = list(suite.methods)
    if methods is not None:
        entries = select_entries(suite, list(methods), tuple(OPTIMIZERS))
    if steps is not None:
        if steps < 1:
            raise ValueError(f"Invalid steps: {steps} (must be >= 1)")
        suite = suite.with_steps(steps)
    require_empty_output_dir(output, "bench")
    runs_of = _with_seeds(entries, seeds)
    started = time.perf_counter()
    print(
        f"blockllm bench --suite {suite.name}: {len(runs_of)} runs, {suite.steps} steps of "
        f"{suite.command} {suite.model}, each in its own process",
        flush=True,
    )
    _prepare(suite, cache_dir)

    environment = collect_environment()
    (output / "runs").mkdir(parents=True)
    records: list[dict[str, Any]] = []
    runs = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for number, (entry, seed) in enumerate(runs_of, start=1):
        prefix = f"[{number}/{len(runs_of)}] {entry.label}"
        environment = {**environment, "seed": seed}
        unavailable = _unavailable(entry.optimizer)
        if unavailable is not None:
            print(f"{prefix}: skipped ({unavailable.splitlines()[-1]})", flush=True)
            records.append(_not_run(entry, "skipped", unavailable, environment))
            _write_records(output, suite, records)
            continue
        print(f"{prefix} ...", flush=True)
        run_dir = output / "runs" / entry.label
        command = child_command(suite, entry, run_dir, cache_dir, threads, seed)
        run_started = time.perf_counter()
        report = None if status is None else status(entry.label, run_dir, suite.steps)
        code, stderr = _run_child(command, output / "runs" / f"{entry.label}.stderr", report)
        wall = time.perf_counter() - run_started
        run = _load_finished(run_dir, load_run) if code == 0 else None
        if run is None:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
            print(f"    failed: {last}", flush=True)
            records.append({**_not_run(entry, "failed", last, environment), "exit_code": code})
            _write_records(output, suite, records)
            continue
        run.name = entry.label
        runs.append(run)
        summary = run.summary or {}
        curves[entry.label] = {
            key: eval_curve(summary, run.metrics, key) for key in ("eval_loss", "eval_accuracy")
        }
        record = method_record(entry.label, entry.optimizer, summary, wall)
        record.update(lr=run.config.get("lr"), flags=list(entry.flags), **environment)
        record["entry"] = entry.label.removesuffix(f"-s{seed}") if seeds else entry.label
        records.append(record)
        print(f"    done in {wall:.0f} s ({record['train_seconds']:.0f} s training)", flush=True)
        _write_records(output, suite, records)

    equal_time = add_equal_time(records, curves)
    baseline = choose_baseline(records, suite.baseline_optimizer)
    _write_records(output, suite, records)
    plots = _write_plots(runs, output)
    table = markdown_table(records, baseline)
    if seeds:
        table = seed_table(records, suite.baseline_optimizer) + "\n\nEvery run:\n\n" + table
    total = time.perf_counter() - started
    (output / f"{suite.name}.md").write_text(
        _markdown(suite, table, records, environment, total, equal_time, baseline, plots, seeds),
        encoding="utf-8",
    )
    print()
    print(table)
    print()
    print(f"bench finished in {total:.0f} s; wrote {output / (suite.name + '.json')} and .md")


def _with_seeds(
    entries: list[MethodEntry], seeds: Sequence[int] | None
) -> list[tuple[MethodEntry, int]]:
    """Every (entry, seed) to run: labels get ``-sSEED`` when several seeds were asked for.

    Seed by seed, the entries' order reversed every other seed (A B, B A, A B ...): on a
    machine whose speed drifts (a shared or virtual one drifts by 10 % within minutes) the
    entries of one seed then run next to each other, and a method that always ran first would
    otherwise collect the drift as a speed difference. Losses do not depend on the order.
    """
    if not seeds:
        return [(entry, SEED) for entry in entries]
    return [
        (replace(entry, label=f"{entry.label}-s{seed}"), seed)
        for turn, seed in enumerate(seeds)
        for entry in (entries if turn % 2 == 0 else entries[::-1])
    ]


def child_command(
    suite: Suite,
    entry: MethodEntry,
    run_dir: Path,
    cache_dir: Path,
    threads: int | None,
    seed: int = SEED,
) -> list[str]:
    """``python -m blockllm COMMAND ...`` for one entry: the suite's flags, then the entry's.

    ``--save-every -1``: a benchmark child writes no checkpoint at all (a llama-20m checkpoint
    with AdamW state is hundreds of MB, and nothing ever resumes a bench child).
    """
    command = [
        sys.executable, "-m", "blockllm", suite.command, *suite.shared_flags(),
        "--optimizer", entry.optimizer, *entry.flags, "--output-dir", str(run_dir),
        "--seed", str(seed), "--save-every", "-1", "--no-tensorboard",
        "--cache-dir", str(cache_dir), "--progress", "off", "--log-level", "warning",
    ]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    return command


def _prepare(suite: Suite, cache_dir: Path) -> None:
    """What every child needs once, done before any starts (so no child is charged for it).

    A failure here (a missing package) is only reported: the children then fail with the
    package's install line, and each is recorded as failed.
    """
    try:
        if suite.corpus is not None:
            print("preparing the corpus slice and the tokenizer (cached) ...", flush=True)
            prepare_tokenizer(*suite.corpus, cache_dir)
        if suite.prepare_gemma:
            from blockllm.app.models.gemma_cache import gemma_checkpoint

            print("converting Gemma-3-270M (cached; 70-90 s the first time) ...", flush=True)
            gemma_checkpoint(cache_dir)
    except ImportError as exc:
        print(f"could not prepare the suite: {str(exc).splitlines()[0]}", flush=True)


def require_empty_output_dir(output: Path, command: str) -> None:
    """Refuse an output directory that already holds something: nothing is ever overwritten.

    Raises:
        RunDirError: ``output`` exists and is a file or a non-empty directory.
    """
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RunDirError(
            f"{command} output directory {output} exists and is not empty; choose another "
            "--output-dir"
        )


def prepare_tokenizer(max_chars: int, vocab_size: int, cache_dir: Path) -> None:
    """Train (or find cached) the stdlib tokenizer once in the parent, before child runs start.

    The data layer's progress lines are quieted unless the user asked for debug output: the
    command has already said what is happening.
    """
    from blockllm.app.data import load_documents, train_or_load_tokenizer

    data_logger = logging.getLogger("blockllm.app.data")
    previous_level = data_logger.level
    if data_logger.getEffectiveLevel() >= logging.INFO:
        data_logger.setLevel(logging.WARNING)
    try:
        documents = load_documents("stdlib", max_chars=max_chars)
        train_or_load_tokenizer(documents, vocab_size, cache_dir / "tokenizers")
    finally:
        data_logger.setLevel(previous_level)


def _unavailable(optimizer: str) -> str | None:
    """Why ``optimizer`` cannot run here (not registered, or its package missing), or None."""
    from blockllm.app.methods import OPTIMIZERS
    from blockllm.app.methods.peer_packages import missing_requirement

    if optimizer not in OPTIMIZERS:
        return (
            f"optimizer {optimizer!r} is not registered in this blockllm "
            "(see PAPER_METHOD in blockllm.app.bench.suites)"
        )
    return missing_requirement(optimizer)


def _not_run(
    entry: MethodEntry, status: str, reason: str, environment: dict[str, Any]
) -> dict[str, Any]:
    return {
        "method": entry.label, "optimizer": entry.optimizer, "status": status, "reason": reason,
        "flags": list(entry.flags), **environment,
    }  # fmt: skip


def _load_finished(run_dir: Path, load_run: Any) -> Any:
    """The finished run in ``run_dir``, or None when it left no readable ``summary.json``."""
    try:
        run = load_run(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    return run if run.summary is not None else None


def _write_records(output: Path, suite: Suite, records: list[dict[str, Any]]) -> None:
    path = output / f"{suite.name}.json"
    path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")


def _write_plots(runs: list[Any], output: Path) -> list[str]:
    """The suite's PNGs; a plotting failure (no matplotlib) costs the pictures, not the results."""
    from blockllm.app.bench.plots import (
        plot_accuracy_vs_step,
        plot_loss_vs_step,
        plot_loss_vs_time,
        plot_memory,
    )

    if not runs:
        return []
    plots = [
        (plot_loss_vs_step, "loss_vs_step.png"),
        (plot_loss_vs_time, "loss_vs_time.png"),
        (plot_memory, "memory.png"),
    ]
    if any(run.last("eval_accuracy") is not None for run in runs):
        plots.append((plot_accuracy_vs_step, "accuracy_vs_step.png"))
    try:
        for plot, name in plots:
            plot(runs, output / name)
    except ImportError as exc:
        print(f"no plots: {str(exc).splitlines()[0]}", flush=True)
        return []
    return [name for _, name in plots]


# Seconds between two calls of a run's status callable.
STATUS_EVERY_S = 30.0


def _run_child(
    command: list[str], stderr_path: Path, status: Callable[[], None] | None = None
) -> tuple[int, str]:
    """Run one method to completion, calling ``status`` every :data:`STATUS_EVERY_S` seconds;
    its stderr is kept in ``stderr_path`` for failures. Ctrl-C stops the child too (a bench
    child keeps no checkpoint worth finishing)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env) as child:
            try:
                while True:
                    try:
                        code = child.wait(timeout=STATUS_EVERY_S if status is not None else None)
                        break
                    except subprocess.TimeoutExpired:
                        assert status is not None
                        status()
            except BaseException:
                child.kill()
                raise
    return code, stderr_path.read_text(encoding="utf-8", errors="replace")


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
    table: str,
    records: list[dict[str, Any]],
    environment: dict[str, Any],
    total: float,
    equal_time: float | None,
    baseline: dict[str, Any] | None,
    plots: list[str],
    seeds: Sequence[int] | None = None,
) -> str:
    """The suite's report: what ran, the table, how to read it, and where it ran."""
    done = [r for r in records if r.get("status") == "ok"]
    threads = next((r.get("threads") for r in done if r.get("threads")), None)
    precision = next((r.get("precision") for r in done if r.get("precision")), None)
    params = next((r.get("num_parameters") for r in done if r.get("num_parameters")), 0) or 0
    accuracy = any(r.get("accuracy") is not None for r in done)
    by = "highest accuracy" if accuracy else "lowest final eval loss"
    reference = (
        f"the reference row is **{baseline['method']}**, the best {suite.baseline_optimizer} "
        f"entry by {by}; ratios (×) and differences are against it"
        if baseline is not None
        else f"no {suite.baseline_optimizer} entry finished, so there are no ratios"
    )
    when = f"T = {equal_time:.1f} s" if equal_time is not None else "T (no method finished)"
    rows = "\n".join(
        f"| {r['method']} | {r.get('optimizer')} | {' '.join(r.get('flags') or []) or '-'} | "
        f"{r.get('train_seconds', 'n/a')} | {r.get('wall_seconds', 'n/a')} | {r['status']} |"
        for r in records
    )
    pictures = " ".join(f"![{name[:-4].replace('_', ' ')}]({name})" for name in plots)
    return f"""# blockllm bench --suite {suite.name}

{suite.description}: `blockllm {suite.command}` with `{" ".join(suite.shared_flags())}` for
every method ({params / 1e6:.2f}M parameters), {_seed_words(seeds)}, {precision}, each method in its own
process, plus the method's own flags below. In the table {reference}. Training memory is peak
RSS less the RSS just before the first step; training state is parameters + gradients +
optimizer state + master weights, counted from tensors, each at its peak. *Eval loss at T* is
each method's eval loss interpolated linearly between its evaluations (eval loss against
training time, evaluation excluded; the evaluation before the first step is the point at 0 s)
at one common time {when}: the shortest training time among the methods that finished.

{table}

| method | optimizer | own flags | training s | wall s | status |
|---|---|---|---|---|---|
{rows}

Whole bench: {total:.0f} s. torch {environment["torch_version"]}, {environment["cpu"]},
{environment["cpu_count"]} cores, {threads} threads per run, GPU {environment["cuda"]},
commit {environment["git_commit"]}.

{pictures}
"""


def _seed_words(seeds: Sequence[int] | None) -> str:
    if not seeds:
        return f"seed {SEED}"
    return f"seeds {', '.join(map(str, seeds))} (model init and data order; one run each)"


__all__ = [
    "SEED",
    "child_command",
    "collect_environment",
    "git_commit",
    "prepare_tokenizer",
    "require_empty_output_dir",
    "run_bench",
]
