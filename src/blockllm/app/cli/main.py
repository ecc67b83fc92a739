"""Entry point of the ``blockllm`` command: argument parsing, logging, and exit codes.

Exit codes: 0 success; 2 bad input (argparse errors, unknown names, missing or empty data, a
corrupt or mismatched checkpoint, an output directory that holds another run, a missing optional
package), reported as one ``blockllm: error: ...`` line on stderr (the missing-package message
adds the ``pip install`` line to copy); 128 + N when signal N stopped
training after saving a checkpoint (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP); 3 when, under torchrun,
another rank died or hung (one ``blockllm: error: ...`` line; the last checkpoint is intact); 1
for anything unexpected, with the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
EXIT_RANK_FAILURE = 3  # retryable with --resume, unlike bad input

_LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    """The ``blockllm`` parser with every subcommand."""
    from blockllm import __version__
    from blockllm.app.cli.bench_command import add_bench_parser
    from blockllm.app.cli.demo import add_demo_parser
    from blockllm.app.cli.estimate_command import add_estimate_parser
    from blockllm.app.cli.report_command import add_report_parser
    from blockllm.app.cli.train_commands import add_finetune_parser, add_pretrain_parser

    parser = argparse.ArgumentParser(
        prog="blockllm",
        description="Train and finetune language models in less memory with BlockLLM "
        "(Adam on a small, gradient-selected set of parameter tensors).",
        epilog="Start with `blockllm demo`; `blockllm COMMAND --help` lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"blockllm {__version__}")
    log_help = "messages to show on stderr (default: info; debug adds tracebacks to errors)"
    parser.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help=log_help)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (add_demo_parser, add_pretrain_parser, add_finetune_parser, add_report_parser):
        add(subparsers)
    add_bench_parser(subparsers)
    add_estimate_parser(subparsers)
    for subparser in subparsers.choices.values():
        # Also accepted after the subcommand; SUPPRESS keeps the subcommand from overwriting a
        # value given before it with a default.
        subparser.add_argument(
            "--log-level", choices=_LOG_LEVELS, default=argparse.SUPPRESS, help=log_help
        )
    return parser


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``; quiet third-party chatter unless debugging."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if level != "debug":
        # transformers warns about expected things here (a new classification head is untrained).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("urllib3", "filelock", "matplotlib", "PIL", "httpx", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blockllm`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse exits with 2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    configure_logging(args.log_level)
    from blockllm.app.cli.torchrun import configure_rank_logging
    from blockllm.app.training.data_parallel import is_main_process

    configure_rank_logging(args.log_level)
    debug = args.log_level == "debug"
    from blockllm.app.training.run_errors import DistributedTrainingError, TrainingInterrupted
    from blockllm.errors import BlockLLMError

    try:
        return int(args.handler(args))
    except TrainingInterrupted as exc:
        if is_main_process():  # under torchrun every rank stops; rank 0 says so
            try:
                print(f"blockllm: {exc}", file=sys.stderr)
            except OSError:
                # After SIGHUP the terminal may be gone (writes fail with EIO); the checkpoint
                # is saved, and the exit code still says why the run stopped.
                pass
        return 128 + exc.signal_number
    except DistributedTrainingError as exc:
        _report(f"blockllm: error: {' '.join(str(exc).split())}", exc, debug)
        return EXIT_RANK_FAILURE
    except KeyboardInterrupt:
        print("blockllm: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:
        # Kept on its own lines: the last one is the exact `pip install` command to copy.
        _report(f"blockllm: error: {exc}", exc, debug)
        return EXIT_BAD_INPUT
    except (BlockLLMError, ValueError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        _report(f"blockllm: error: {message}", exc, debug)
        return EXIT_BAD_INPUT


def _report(message: str, exc: BaseException, debug: bool) -> None:
    if debug:
        logging.getLogger(__name__).debug("traceback", exc_info=exc)
    print(message, file=sys.stderr)


__all__ = ["build_parser", "main"]
