"""Time of one state-free rest step on vocabulary-shaped matrices, beside fused AdamW's step.

The default rest rules run in the gradient hooks every step: ``sign`` on most matrices and the
factored rule on the embedding and head, the largest tensors of a language model. This times one
whole rest step (the clipping norm, the direction, the update of the weight, the gradient freed)
per rule on a single tensor of each shape, and ``torch.optim.AdamW(fused=True)``'s step with
``clip_grad_norm_`` before it on the same tensor, for scale. Median of repeats; a fresh gradient
is copied in, untimed, before each step. ``--live-rows N`` zeroes all but N random rows of the
gradient, as an embedding's gradient is zero outside the batch's tokens. Run it against another
checkout's library to compare two versions:

    .venv/bin/python benchmarks/rest_step_time.py [--threads 2] [--repeats 10] [--live-rows 2048]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/rest_step_time.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

# Internal: the stepper alone, without a model, a selection or hooks around it.
from blockllm.distributed.base import SingleProcess
from blockllm.optim.rest_step import RestStepper
from blockllm.selection.rest_rules import make_rest_rule

# (rows, columns): tiny's head, llama-20m's and llama-350m's embedding, MiniLM's embedding.
SHAPES = ((8192, 256), (32000, 256), (32000, 1024), (30522, 384))
RULES = ("sign", "factored")


def median_ms(step, reset, repeats: int) -> float:
    """Median time of ``step()``, each repeat after an untimed ``reset()``."""
    times = []
    for repeat in range(repeats + 2):  # two warm-ups: first-touch allocation, the rule's state
        reset()
        start = time.perf_counter()
        step()
        if repeat >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rest_step_ms(rule: str, gradient: torch.Tensor, repeats: int) -> float:
    weight = torch.nn.Parameter(torch.randn(gradient.shape))
    stepper = RestStepper(
        make_rest_rule(rule), lr_scale=1.0, weight_decay=None, params=[weight],
        groups=[{"lr": 1e-3, "weight_decay": 0.0}], comm=SingleProcess(), in_backward=True,
        held=lambda: False,
    )  # fmt: skip

    def reset() -> None:
        weight.grad = gradient.clone()

    def step() -> None:
        stepper.release(0)
        stepper.end_step()

    return median_ms(step, reset, repeats)


def adamw_step_ms(gradient: torch.Tensor, repeats: int) -> float:
    weight = torch.nn.Parameter(torch.randn(gradient.shape))
    optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)

    def reset() -> None:
        weight.grad = gradient.clone()

    def step() -> None:  # the rest step measures the clipping norm too: AdamW's clip is counted
        torch.nn.utils.clip_grad_norm_([weight], 1.0)
        optimizer.step()

    return median_ms(step, reset, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--live-rows", type=int, default=None,
        help="nonzero gradient rows (an embedding's: the batch's distinct tokens); default all",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import blockllm

    source = Path(blockllm.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    print(f"blockllm from {source} ({commit or 'no git'}), torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}, "
          f"live rows: {args.live_rows or 'all'}")  # fmt: skip
    print(f"{'shape':>14}  {'AdamW+clip':>11}  " + "  ".join(f"{rule:>9}" for rule in RULES))
    for shape in SHAPES:
        gradient = torch.randn(shape)
        if args.live_rows is not None and args.live_rows < shape[0]:
            gradient[torch.randperm(shape[0])[args.live_rows :]] = 0.0
        adamw = adamw_step_ms(gradient, args.repeats)
        rest = [rest_step_ms(rule, gradient, args.repeats) for rule in RULES]
        label = f"{shape[0]} x {shape[1]}"
        print(f"{label:>14}  {adamw:8.1f} ms  " + "  ".join(f"{ms:6.1f} ms" for ms in rest))


if __name__ == "__main__":
    main()
