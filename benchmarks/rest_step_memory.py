"""Bytes one state-free rest step allocates beyond the gradient, in the form a GPU takes.

A rest step runs in the gradient hooks, at the backward's peak, so whatever it allocates over a
vocabulary matrix adds to that peak. This measures one factored rest step (the default rule) on a
single matrix with the CPU allocator's events (``torch.profiler``, ``profile_memory=True``):
the most bytes held at once beyond what existed before the step. ``--accelerator`` (the default)
runs the accelerator's form of each pass on this CPU by claiming every tensor is on an
accelerator, which is how a GPU run of the library steps; ``--dense`` forces the dense path
(the rule's direction written out whole), which is what a GPU took up to 0.6.2. Run it against
another checkout's library to compare two versions:

    .venv/bin/python benchmarks/rest_step_memory.py [--rows 32000 --cols 2048] [--dense]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/rest_step_memory.py --dense

On a CPU a mixed bf16 x fp32 multiply casts its bf16 input to fp32 first (a GPU casts inside
the kernel), so in bf16 the dense path's figure here holds one fp32 copy more than a GPU's.
"""

from __future__ import annotations

import argparse

import torch

from blockllm.app.bench.allocations import peak_allocated

# Internal: the stepper alone, without a model, a selection or hooks around it.
from blockllm.distributed.base import SingleProcess
from blockllm.optim import rest_step
from blockllm.selection import rest_rules
from blockllm.selection.rest_rules import FactoredRest


def step_peak(rows: int, cols: int, dtype: torch.dtype) -> tuple[int, int]:
    """(gradient bytes, the step's peak beyond them) of the second step (the rule has state)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, cols).to(dtype))
    stepper = rest_step.RestStepper(
        FactoredRest(0.99), lr_scale=1.0, weight_decay=0.0, params=[weight],
        groups=[{"lr": 1e-3, "weight_decay": 0.0}], comm=SingleProcess(), in_backward=True,
        held=lambda: False,
    )  # fmt: skip
    peak = 0
    for _ in range(2):
        weight.grad = torch.randn(rows, cols).to(dtype)
        peak = peak_allocated(lambda: stepper.release(0))
        stepper.end_step()
    return rows * cols * dtype.itemsize, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32000, help="(default: llama-1b's vocabulary)")
    parser.add_argument("--cols", type=int, default=2048, help="(default: llama-1b's hidden size)")
    parser.add_argument("--dense", action="store_true", help="force the dense path (0.6.2's GPU path)")
    parser.add_argument("--cpu", action="store_true", help="the CPU's own form instead")
    args = parser.parse_args()
    if not args.cpu:
        rest_rules._on_accelerator = lambda tensor: True
    if args.dense:
        rest_step.RestStepper._in_place = lambda *_: False
    form = ("cpu" if args.cpu else "accelerator") + (", dense path" if args.dense else "")
    for dtype in (torch.float32, torch.bfloat16):
        grad_bytes, peak = step_peak(args.rows, args.cols, dtype)
        print(
            f"{args.rows} x {args.cols} {str(dtype).removeprefix('torch.'):8s} ({form}): "
            f"gradient {grad_bytes / 1e6:7.1f} MB, the step's peak beyond it {peak / 1e6:7.1f} MB"
        )


if __name__ == "__main__":
    main()
