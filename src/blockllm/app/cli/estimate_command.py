"""``blockllm estimate``: the memory one training step needs, per method, without allocating the model."""

from __future__ import annotations

import argparse
import json
from typing import Any

ESTIMATE_EPILOG = """\
MODEL is a preset (tiny, llama-20m ... llama-1b; vocabulary as in pretraining unless
--vocab-size) or a Hugging Face config.json (or the directory holding it). The model is built on
the meta device: nothing is allocated, an 8B config takes seconds.

With --fit GB it also prints, for each method, the largest micro-batch whose estimate fits in
GB (10^9 bytes); --batch-size is then optional (the table is left out without it).

examples:
  blockllm estimate --model llama-1b --batch-size 16 --seq-len 256
  blockllm estimate --model llama-1b --seq-len 256 --precision bf16-pure --fit 24
  blockllm estimate --model path/to/config.json --batch-size 1 --seq-len 4096 \\
      --precision bf16-pure --gradient-checkpointing --optimizer adamw blockllm --json
"""


def add_estimate_parser(subparsers: Any) -> None:
    from blockllm.app.planning.activation_memory import PRECISIONS
    from blockllm.app.training.library_knobs import builtin_names

    parser = subparsers.add_parser(
        "estimate",
        help="estimate the GPU memory of a training step, per method",
        description="Estimate weights, gradients, optimizer state, master weights and "
        "activations of one training step for each method, and how they compare with AdamW.",
        epilog=ESTIMATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME_OR_CONFIG", help="a preset or a config.json path"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="sequences per micro-batch (required unless --fit is given)",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    parser.add_argument(
        "--optimizer", nargs="+", action="extend", metavar="NAME", default=None,
        help="methods to estimate (default: adamw, blockllm and the peers it is compared with)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp32; bf16 = fp32 weights under bf16 autocast (pretrain --precision bf16); "
        "bf16-pure = bf16 weights with fp32 master copies (default: fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="total with activation checkpointing (both activation columns are always shown)",
    )  # fmt: skip
    parser.add_argument(
        "--sparsity", type=float, default=0.9,
        help="BlockLLM's share of coordinates not updated; LISA's share of frozen layers (default 0.9)",
    )  # fmt: skip
    parser.add_argument("--exclude", metavar="REGEX", default=None,
                        help="BlockLLM: parameters never selected (frozen)")  # fmt: skip
    parser.add_argument("--always-adam", metavar="REGEX", default=None,
                        help="BlockLLM: parameters trained with Adam whole at every step; auto: "
                             "the vectors and the embedding and head")  # fmt: skip
    parser.add_argument(
        "--moment-dtype", choices=builtin_names("moment_dtype"), default="float32",
        help="BlockLLM: the dtype of the block's Adam moments (default: float32)",
    )  # fmt: skip
    parser.add_argument(
        "--master-weights", action=argparse.BooleanOptionalAction, default=True,
        help="BlockLLM under bf16-pure: fp32 master copies of the block (default: on; "
             "--no-master-weights: Adam's step rounded stochastically into the bf16 weights)",
    )  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the model's vocabulary size")  # fmt: skip
    parser.add_argument(
        "--fit", type=float, default=None, metavar="GB",
        help="also print each method's largest micro-batch whose estimate fits in GB (10^9 bytes)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")
    parser.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the estimate; bad names and values raise ``ValueError`` (exit 2 in ``main``)."""
    from blockllm.app.planning.batch_fit import format_fit, largest_batches
    from blockllm.app.planning.memory_plan import estimate_memory, format_plan
    from blockllm.app.planning.method_memory import EstimateSettings

    if args.batch_size is None and args.fit is None:
        raise ValueError("Invalid arguments: give --batch-size, --fit GB, or both")
    if args.fit is not None and not args.fit > 0:
        raise ValueError(f"Invalid fit: {args.fit} GB (must be > 0)")
    for name in ("batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"Invalid {name}: {value} (must be >= 1)")
    settings = EstimateSettings(
        batch_size=args.batch_size or 1, seq_len=args.seq_len, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, sparsity=args.sparsity,
        exclude=args.exclude, always_adam=args.always_adam, moment_dtype=args.moment_dtype,
        master_weights=args.master_weights,
    )  # fmt: skip
    plan = estimate_memory(args.model, settings, args.optimizer, vocab_size=args.vocab_size)
    batches = None
    if args.fit is not None:
        budget = int(args.fit * 1e9)
        batches = largest_batches(plan.shape, settings, [row.method for row in plan.rows], budget)
    if args.json:
        answer = plan.to_dict() if args.batch_size is not None else {"model": plan.to_dict()["model"]}
        if batches is not None:
            answer["fit"] = {"budget_bytes": budget, "seq_len": args.seq_len, "largest_batch": batches}
        print(json.dumps(answer, indent=2))
        return 0
    parts = [format_plan(plan)] if args.batch_size is not None else [plan_heading(plan)]
    if batches is not None:
        parts.append(format_fit(batches, args.seq_len, budget))
    print("\n\n".join(parts))
    return 0


def plan_heading(plan: Any) -> str:
    """The model's line and the step's settings, for ``--fit`` without a table."""
    from blockllm.app.planning.memory_plan import model_line

    settings = plan.settings
    checkpointing = "on" if settings.gradient_checkpointing else "off"
    return (
        f"{model_line(plan.shape)}\nsteps of {settings.seq_len}-token sequences, "
        f"{settings.precision}, activation checkpointing {checkpointing}, sparsity {settings.sparsity:g}"
    )


__all__ = ["add_estimate_parser", "run_estimate"]
