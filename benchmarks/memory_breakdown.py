"""Where the bytes of a training step go, AdamW vs BlockLLM, counted from the tensors themselves.

Issue 14, item 3, on a CPU. torch's categorizing memory profiler (the analysis behind
``export_memory_timeline``) cannot be used here: on torch 2.13 it stops with "version mismatch"
in its data-flow graph at ``aten::cat`` inside the Llama forward (transformers' ``rotate_half``).
So the script counts by category itself and takes only the raw allocation events from
``torch.profiler`` (``profile_memory=True``):

* persistent bytes before a step, per category (parameters, optimizer state, masters), from the
  live tensors (``tensor_bytes``, the same count the CLI's training-state figure uses);
* the most gradient bytes held at any one moment, sampled in a hook after every gradient lands
  (registered after the optimizer's own hooks, so a gradient the rest rule frees is not counted);
* the bytes the forward saves for backward (``saved_tensors_hooks``, storages counted once,
  parameters excluded);
* the tensor peak of each step: the bytes alive at its start plus the largest running sum of
  the profiler's allocation events inside it; what the named categories do not explain is
  temporaries (autograd's and the optimizer's own);
* what ``step()`` itself allocates above the bytes alive when it starts (the largest over the
  ordinary steps), a part of the temporaries;
* the process's peak RSS (the allocator's cache and the interpreter on top of the tensors).

The three transient categories peak at different moments (activations at the end of the forward,
gradients at the end of the backward), so they are maxima, not slices of one moment. The step
that scores a new selection is compared with an ordinary step: BlockLLM must not exceed the
latter's peak by more than its largest gradient. Each method runs in its own interpreter so that
the RSS of one does not hide in the pages of another.

    .venv/bin/python benchmarks/memory_breakdown.py                       # tiny, about 1 min
    .venv/bin/python benchmarks/memory_breakdown.py --preset llama-60m --vocab-size 32000 \
        --batch-size 4

Prints one table and writes it to ``benchmarks/results/memory_breakdown.json``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from blockllm import BlockLLM
from blockllm.app.bench.allocations import allocation_events
from blockllm.app.models.presets import build_llama
from blockllm.app.training.memory import peak_rss_bytes, tensor_bytes

METHODS = ("adamw", "blockllm", "blockllm-frozen", "blockllm-bf16-pure")
MB = 1e6


def make_optimizer(method: str, model: torch.nn.Module, args: argparse.Namespace):
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    rest = {"rest": "none"} if method == "blockllm-frozen" else {}
    # An interval as short as the profiled window, so that one of its steps scores a selection.
    return BlockLLM(
        model.named_parameters(), lr=1e-3, sparsity=args.sparsity, trigger="interval",
        patience=args.steps - 1, compact_grads=True, **rest,
    )  # fmt: skip


def train_step(model, optimizer, tokens) -> None:
    finish_step(optimizer, model(input_ids=tokens, labels=tokens).loss)


def finish_step(optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    with record_function("optimizer_step"):
        if isinstance(optimizer, BlockLLM):
            optimizer.step(loss=loss)
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class GradientWatch:
    """The most gradient bytes held at once: sampled after each gradient lands."""

    def __init__(self, model: torch.nn.Module, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.most, self.handles = 0, []

    def rearm(self) -> None:
        """Hook the tensors that take gradients now (the frozen-rest mode changes them)."""
        for handle in self.handles:
            handle.remove()
        self.handles = [
            param.register_post_accumulate_grad_hook(
                lambda _p: self.sample(self.model, self.optimizer)
            )
            for param in self.model.parameters()
            if param.requires_grad
        ]

    def sample(self, model, optimizer) -> None:
        self.most = max(self.most, tensor_bytes(model, optimizer)["grads"])


class SavedActivations:
    """Bytes the forward saves for the backward, each storage once, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def measure(method: str, args: argparse.Namespace) -> dict:
    """One method's breakdown; runs in a child process (see main)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_llama(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    if method.endswith("-bf16-pure"):  # as `--precision bf16-pure`: bf16 weights, fp32 masters
        model = model.to(torch.bfloat16)
    optimizer = make_optimizer(method, model, args)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.steps + 1)
    ]
    train_step(model, optimizer, batches[0])  # state exists, the first selection is made
    persistent = tensor_bytes(model, optimizer)
    gradients = GradientWatch(model, optimizer)
    selecting_steps, saved = [], []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for step, tokens in enumerate(batches[1:]):
            selections = getattr(optimizer, "num_selections", 0)
            activations = SavedActivations(model)
            gradients.rearm()
            with record_function(f"train_step_{step}"):
                with torch.autograd.graph.saved_tensors_hooks(activations.pack, lambda t: t):
                    loss = model(input_ids=tokens, labels=tokens).loss
                finish_step(optimizer, loss)
            saved.append(activations.nbytes)
            if getattr(optimizer, "num_selections", 0) != selections:
                selecting_steps.append(step)
    events = profiler.profiler.kineto_results.events()
    allocations = allocation_events(profiler)
    windows = {
        int(e.name().rsplit("_", 1)[1]): (e.start_ns(), e.end_ns())
        for e in events
        if e.name().startswith("train_step_")
    }
    # Live bytes at the profile's start are the persistent ones; each step's peak is measured
    # from the live bytes at its own start.
    live, step_peaks, cursor = sum(persistent.values()), {}, 0
    for step, (start, end) in sorted(windows.items()):
        while cursor < len(allocations) and allocations[cursor][0] < start:
            live += allocations[cursor][1]
            cursor += 1
        peak = live
        while cursor < len(allocations) and allocations[cursor][0] <= end:
            live += allocations[cursor][1]
            peak = max(peak, live)
            cursor += 1
        step_peaks[step] = peak
    tensor_peak = max(step_peaks.values())
    # What step() itself allocates above the bytes alive when it starts (the Adam kernel's
    # inputs, widened gradients), largest over the ordinary steps: a selecting step allocates
    # the new block's state, and the frees of the old state (allocated before the profile
    # started) are not among the profiler's events.
    times = [time for time, _ in allocations]
    running = list(itertools.accumulate(nbytes for _, nbytes in allocations))
    ordinary_windows = [w for step, w in windows.items() if step not in selecting_steps]
    step_extra = 0
    for event in events:
        inside_ordinary = any(start <= event.start_ns() <= end for start, end in ordinary_windows)
        if event.name() == "optimizer_step" and inside_ordinary:
            first = bisect.bisect_left(times, event.start_ns())
            last = bisect.bisect_right(times, event.end_ns())
            before = running[first - 1] if first else 0
            step_extra = max([step_extra, *(r - before for r in running[first:last])])
    ordinary = [peak for step, peak in step_peaks.items() if step not in selecting_steps]
    selecting = [peak for step, peak in step_peaks.items() if step in selecting_steps]
    stateful = persistent["params"] + persistent["optimizer_state"] + persistent["master_weights"]
    return {
        "method": method,
        "params_bytes": persistent["params"],
        "optimizer_state_bytes": persistent["optimizer_state"],
        "master_weights_bytes": persistent["master_weights"],
        "most_gradient_bytes_held": gradients.most,
        "saved_activation_bytes": max(saved),
        # The frozen-rest mode saves no inputs of frozen layers on an ordinary step.
        "ordinary_step_saved_activation_bytes": max(
            (b for step, b in enumerate(saved) if step not in selecting_steps), default=None
        ),
        "tensor_peak_bytes": tensor_peak,
        "unexplained_transient_bytes": tensor_peak - stateful - gradients.most - max(saved),
        "ordinary_step_peak_bytes": max(ordinary) if ordinary else None,
        "optimizer_step_extra_bytes": step_extra,
        "selection_step_peak_bytes": max(selecting) if selecting else None,
        "largest_gradient_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_isolated(method: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh interpreter, so that each method's peak RSS is its own."""
    command = [sys.executable, __file__, "--child", method]
    for key, value in vars(args).items():
        if key not in ("child", "methods", "output"):
            command += [f"--{key.replace('_', '-')}", str(value)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


ROWS = (
    ("parameters", "params_bytes"),
    ("optimizer state", "optimizer_state_bytes"),
    ("fp32 masters", "master_weights_bytes"),
    ("gradients, most held", "most_gradient_bytes_held"),
    ("saved activations", "saved_activation_bytes"),
    ("  of them, ordinary step", "ordinary_step_saved_activation_bytes"),
    ("temporaries (the rest)", "unexplained_transient_bytes"),
    ("tensor peak", "tensor_peak_bytes"),
    ("ordinary step's peak", "ordinary_step_peak_bytes"),
    ("selecting step's peak", "selection_step_peak_bytes"),
    ("  step()'s own, ordinary", "optimizer_step_extra_bytes"),
    ("process peak RSS", "peak_rss_bytes"),
)


def print_table(results: list[dict]) -> None:
    print(f"{'MB':26s}" + "".join(f"{r['method']:>17s}" for r in results))
    for label, key in ROWS:
        cells = "".join(
            f"{'-' if r[key] is None else format(r[key] / MB, '.1f'):>17s}" for r in results
        )
        print(f"  {label:24s}{cells}")
    for r in results:
        if r["selection_step_peak_bytes"] and r["ordinary_step_peak_bytes"]:
            extra = r["selection_step_peak_bytes"] - r["ordinary_step_peak_bytes"]
            print(
                f"{r['method']}: the selecting step's peak is {extra / MB:+.1f} MB against an "
                f"ordinary step's; the largest gradient is {r['largest_gradient_bytes'] / MB:.1f} MB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (one selects)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", default="benchmarks/results/memory_breakdown.json")
    parser.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2: one ordinary step and one that selects")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    results = [run_isolated(method, args) for method in methods]
    print(
        f"{args.preset}, vocab {args.vocab_size}, {args.batch_size}x{args.seq_len}, fp32 (-bf16-pure: bf16 weights), "
        f"s={args.sparsity}, {args.steps} profiled steps; torch {torch.__version__}"
    )
    print_table(results)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = {
        "settings": vars(args),
        "results": results,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "git_commit": commit,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
