"""Training-step time of a preset, AdamW vs BlockLLM with and without row gradients, side by side.

Times whole training steps (forward, backward, clip, optimizer step, zero_grad) in one process,
the methods taking turns in rounds so that a machine that gets busier or quieter affects them
alike. BlockLLM runs the CLI's pretraining recipe (sparsity 0.9, a reselection every 20 steps,
compacted gradients): with its default rest rule (every weight steps, so the whole backward
runs; the factored rule since 0.6), with 0.5's sign rule (``blockllm-sign``), the same with a
larger block in bf16 moments (``--bf16-sparsity``, default 0.82: the
block the same bytes hold with ``moment_dtype="bfloat16"``), on bf16 weights
(``blockllm-bf16-pure``, as ``--precision bf16-pure``; not in the default set), and with the frozen rule
(``rest="none"``) once with ``RowGradients(model, optimizer)`` and once without, so the ratio
between those two is what the row gradients buy. Step time does not depend on the text, so the
batches are random tokens. Prints tokens/s and ratios to AdamW, and writes them to
``benchmarks/results/training_step.json``.

    .venv/bin/python benchmarks/training_step.py                # about 4 min on 2 cores
    .venv/bin/python benchmarks/training_step.py --profile 20   # where the time goes, per op
    .venv/bin/python benchmarks/training_step.py --phases --kinds adamw,blockllm  # per phase
    .venv/bin/python benchmarks/training_step.py --preset llama-20m --vocab-size 32000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from blockllm import BlockLLM, RowGradients
from blockllm.app.models.presets import build_llama

KINDS = ("adamw", "blockllm", "blockllm-sign", "blockllm-bf16-moments", "blockllm-frozen",
         "blockllm-frozen-rows", "blockllm-bf16-pure")


def make_optimizer(kind: str, model: torch.nn.Module, args: argparse.Namespace):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    knobs = {"sparsity": args.sparsity}
    if kind == "blockllm-bf16-moments":
        knobs = {"sparsity": args.bf16_sparsity, "moment_dtype": "bfloat16"}
    elif kind == "blockllm-sign":  # 0.5's default rule
        knobs["rest"], knobs["factored_beta2"] = "sign", 0.999
    elif kind not in ("blockllm", "blockllm-bf16-pure"):
        knobs["rest"] = "none"
    optimizer = BlockLLM(
        model.named_parameters(), lr=1e-3, trigger="interval", patience=args.interval,
        compact_grads=True, **knobs,
    )  # fmt: skip
    if kind == "blockllm-frozen-rows":
        RowGradients(model, optimizer)
    return optimizer


def timed_step(model, optimizer, tokens) -> tuple[float, float, float]:
    """One training step; seconds of its forward, backward (with the hooks' rest steps) and the
    clip + optimizer step + zero_grad."""
    started = time.perf_counter()
    loss = model(input_ids=tokens, labels=tokens).loss
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    if isinstance(optimizer, BlockLLM):
        optimizer.clip_grad_norm_(1.0)
        optimizer.step(loss=loss)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return forward - started, backward - forward, time.perf_counter() - backward


def train_steps(model, optimizer, batches) -> float:
    started = time.perf_counter()
    for tokens in batches:
        timed_step(model, optimizer, tokens)
    return time.perf_counter() - started


def print_phases(runs, rounds: int, batches) -> None:
    """Median milliseconds per step of each phase, the methods taking turns as in the timing:
    with a rest rule the state-free steps run inside the backward, so their cost shows there."""
    phases = ("forward", "backward", "clip+step")
    spent = {kind: {phase: [] for phase in phases} for kind in runs}
    for _ in range(rounds):
        data = batches()
        for kind, (model, optimizer) in runs.items():
            for tokens in data:
                for phase, seconds in zip(phases, timed_step(model, optimizer, tokens)):
                    spent[kind][phase].append(seconds * 1000)
    for kind, times in spent.items():
        medians = {phase: statistics.median(values) for phase, values in times.items()}
        parts = "  ".join(f"{phase} {ms:7.1f}" for phase, ms in medians.items())
        print(f"  {kind:22s} {parts}  total {sum(medians.values()):7.1f} ms/step")


def print_profiles(runs, batches) -> None:
    from torch.profiler import ProfilerActivity, profile

    for kind, (model, optimizer) in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            train_steps(model, optimizer, batches)
        events = profiler.key_averages()
        total = sum(event.self_cpu_time_total for event in events) / 1e6
        print(f"{kind}: {len(batches)} steps, {total:.2f} s of operator time; the largest:")
        for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]:
            print(f"  {event.self_cpu_time_total / 1e6:7.2f} s  {event.key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--bf16-sparsity", type=float, default=0.82,
                        help="sparsity of the bf16-moments entry")  # fmt: skip
    parser.add_argument("--interval", type=int, default=20, help="steps between reselections")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/training_step.json")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS",
        help="instead of timing, profile STEPS steps per method (torch.profiler) and print the "
        "operators that take the most time",
    )  # fmt: skip
    parser.add_argument(
        "--phases", action="store_true",
        help="instead of tokens/s, print each method's median ms per step of forward, backward "
        "(with the rest steps in its hooks) and clip + step",
    )  # fmt: skip
    parser.add_argument(
        "--kinds", default=",".join(KINDS[:-1]), help=f"comma-separated subset of {', '.join(KINDS)}"
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    kinds = tuple(args.kinds.split(","))
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or "adamw" not in kinds:
        parser.error(f"--kinds: unknown {unknown} or no adamw (the reference) in {args.kinds!r}")
    runs = {}
    for kind in kinds:
        model = build_llama(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
        if kind == "blockllm-bf16-pure":  # as `--precision bf16-pure`: bf16 weights, fp32 masters
            model = model.to(torch.bfloat16)
        runs[kind] = (model, make_optimizer(kind, model, args))
    generator = torch.Generator().manual_seed(0)

    def batches(count):
        shape = (args.batch_size, args.seq_len)
        return [torch.randint(0, args.vocab_size, shape, generator=generator) for _ in range(count)]

    for model, optimizer in runs.values():  # warm-up: the first selection, allocator, kernels
        train_steps(model, optimizer, batches(3))
    if args.profile:
        print_profiles(runs, batches(args.profile))
        return
    if args.phases:
        print_phases(runs, args.rounds, lambda: batches(args.steps))
        return
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        data = batches(args.steps)
        for kind, (model, optimizer) in runs.items():
            seconds[kind].append(train_steps(model, optimizer, data))

    tokens = args.steps * args.batch_size * args.seq_len
    speed = {kind: tokens / statistics.median(values) for kind, values in seconds.items()}
    print(f"{args.preset}, vocab {args.vocab_size}, {args.batch_size}x{args.seq_len}, "
          f"s={args.sparsity} (bf16 moments: {args.bf16_sparsity}), "
          f"reselect every {args.interval}, {args.threads} threads, "
          f"median of {args.rounds} rounds of {args.steps} steps")  # fmt: skip
    for kind in kinds:
        ratio = speed[kind] / speed["adamw"]
        print(f"  {kind:22s} {speed[kind]:9,.0f} tokens/s  {ratio:.2f}x AdamW")
    if {"blockllm-frozen-rows", "blockllm-frozen"} <= set(kinds):
        rows = speed["blockllm-frozen-rows"] / speed["blockllm-frozen"]
        print(f"  row gradients: {rows:.2f}x the frozen rule without")

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = {
        "settings": vars(args),
        "tokens_per_s": speed,
        "seconds_per_round": seconds,
        "ratio_to_adamw": {kind: speed[kind] / speed["adamw"] for kind in kinds},
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "git_commit": commit,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
