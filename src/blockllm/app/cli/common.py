"""Flags shared by ``blockllm pretrain`` and ``blockllm finetune``, built from ``RunConfig``.

Every config flag is declared with ``default=argparse.SUPPRESS``, so the parsed namespace holds
only what the user typed. That lets one rule serve both fresh runs and ``--resume``: the base is
the command/model defaults (fresh) or the saved ``config.json`` (resume), and typed flags override
it. ``blockllm pretrain --output-dir runs/x --resume`` therefore needs no other flag, and a typed
flag that contradicts the saved run is reported, not silently applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from blockllm.app.training.library_knobs import builtin_names
from blockllm.app.training.run_config import (
    BLOCKLLM_KNOBS,
    PRECISIONS,
    TASK_KINDS,
    RunConfig,
    defaults_for,
    field_help,
)

# Which config fields each command shows, grouped for --help. Names are RunConfig fields; the flag
# is the kebab-case name.
_COMMON_GROUPS: dict[str, list[str]] = {
    "optimization": [
        "optimizer", "max_steps", "batch_size", "grad_accum", "seq_len", "lr", "vocab_lr_scale",
        "min_lr_ratio",
        "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "precision", "seed",
        "gradient_checkpointing",
    ],
    "BlockLLM": list(BLOCKLLM_KNOBS),
    "evaluation, logging and checkpoints": [
        "eval_every", "eval_at_start", "log_every", "save_every", "keep_checkpoints", "tensorboard",
    ],
    "runtime": ["device"],
}  # fmt: skip
PRETRAIN_FIELDS: dict[str, list[str]] = {
    "model and data": ["model", "data", "vocab_size", "max_chars", "max_tokens", "eval_fraction"],
    **_COMMON_GROUPS,
}
PRETRAIN_FIELDS["evaluation, logging and checkpoints"] = [
    *_COMMON_GROUPS["evaluation, logging and checkpoints"],
    "eval_batches",
]
FINETUNE_FIELDS: dict[str, list[str]] = {
    "model and task": ["model", "task", "task_kind", "max_train_examples", "max_eval_examples"],
    **_COMMON_GROUPS,
}

_CHOICES = {
    "precision": PRECISIONS,
    "task_kind": TASK_KINDS,
    # The library's registries of built-in policies: the same names BlockLLM(...) accepts.
    **{name: builtin_names(name) for name in ("trigger", "selection", "partial", "moment_dtype")},
    "rest": (*builtin_names("rest"), "auto"),
    "vocab_rest": (*(name for name in builtin_names("rest") if name != "none"), "auto"),
}
_FIELD_TYPES = {item.name: item.type for item in dataclasses.fields(RunConfig)}
_METAVARS = {
    "model": "NAME", "data": "SOURCE", "task": "TASK", "optimizer": "NAME", "exclude": "REGEX",
    "always_adam": "REGEX",
    "lr": "LR", "seed": "SEED", "device": "DEVICE",
}  # fmt: skip
# The model flag means different things per command.
_MODEL_HELP = {
    "pretrain": "Llama preset: tiny, llama-20m, llama-60m, llama-130m, llama-350m, llama-1b",
    "finetune": "minilm, gemma-270m, or the path of a saved Hugging Face model",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, without breaking names at their hyphens (``blockllm-`` / ``random``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _optimizer_help() -> str:
    """Every registered name (the built-ins, and any registered before the parser is built)."""
    from blockllm.app.methods import OPTIMIZERS
    from blockllm.app.methods.peer_packages import REQUIREMENTS

    peers = [name for name in OPTIMIZERS if name in REQUIREMENTS]
    return (
        f"one of {', '.join(OPTIMIZERS)}; {', '.join(peers)} need their package "
        '(pip install -e ".[bench]")'
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(annotation: str) -> Any:
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str}.get(base, str)


def add_config_flags(
    parser: argparse.ArgumentParser, command: str, groups: dict[str, list[str]]
) -> None:
    """Add one flag per config field in ``groups``, with the command's default in the help."""
    defaults = defaults_for(command)
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            annotation = str(_FIELD_TYPES[name])
            if name == "model":
                help_text = _MODEL_HELP[command]
            elif name == "optimizer":
                help_text = _optimizer_help()
            else:
                help_text = field_help(name)
            help_text = help_text.replace("%", "%%")
            default = defaults[name]
            if default is not None and annotation == "bool":
                help_text += f" (default: {'on' if default else 'off'})"
            elif default is not None:
                help_text += f" (default: {default})"
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
            if annotation == "bool":
                group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if name in _CHOICES:
                kwargs["choices"] = _CHOICES[name]
            else:
                kwargs["metavar"] = _METAVARS.get(name) or {int: "N", float: "X"}.get(
                    _parse_type(annotation), "VALUE"
                )
            group.add_argument(_flag(name), type=_parse_type(annotation), **kwargs)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that are not part of the config: where to write, resume, runtime knobs."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--output-dir",
        metavar="DIR",
        default=None,
        help="run directory, created if missing (default: runs/COMMAND-MODEL-DATE-TIME, printed "
        "at the start; required with --resume and under torchrun)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --output-dir (flags not given come from its config.json)",
    )
    add_runtime_flags(group)
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before it gives up with an "
        "error (default: 300; must exceed the longest checkpoint save and first-run tokenizer "
        "training or model conversion)",
    )


def add_runtime_flags(group: Any) -> None:
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="tokenizer and model cache (default: $BLOCKLLM_CACHE_DIR or ~/.cache/blockllm)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, usually the core count)",
    )
    group.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "off"),
        default="auto",
        help="progress display: a bar, periodic log lines, or nothing; auto = bar on a terminal",
    )


def config_from_args(
    command: str, args: argparse.Namespace, fields: dict[str, list[str]]
) -> RunConfig:
    """The run config: defaults or the saved config (with --resume), then the typed flags.

    Raises:
        ConfigError: an unknown name or bad value.
        RunDirError: with --resume, the saved config.json is unreadable.
    """
    from blockllm.app.training.rundir import saved_config

    names = [name for group in fields.values() for name in group]
    typed = {name: getattr(args, name) for name in names if hasattr(args, name)}
    saved = (
        saved_config(args.output_dir) if args.resume and Path(args.output_dir).is_dir() else None
    )
    if saved is not None and saved.command == command:
        return RunConfig.from_dict({**saved.to_dict(), **typed})
    return RunConfig.create(command, typed.pop("model", None), **typed)


def default_output_dir(command: str, model: str, *, now: float | None = None) -> Path:
    """``runs/<command>-<model>-<date>-<time>`` (``-2``, ``-3`` ... when that exists already).

    A model given as a path is named by its last component. The time makes a second run land in
    a new folder instead of being refused by the first one's results, as ``blockllm demo`` does.
    """
    name = Path(model).name or "model"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path("runs") / f"{command}-{name}-{stamp}"
    path, number = base, 2
    while path.exists():
        path, number = base.with_name(f"{base.name}-{number}"), number + 1
    return path


def resolve_cache_dir(value: str | None) -> Path:
    from blockllm.app.training.workloads.workload import default_cache_dir

    return Path(os.path.expanduser(value)) if value else default_cache_dir()


__all__ = [
    "FINETUNE_FIELDS",
    "HelpFormatter",
    "PRETRAIN_FIELDS",
    "add_config_flags",
    "add_run_flags",
    "add_runtime_flags",
    "config_from_args",
    "default_output_dir",
    "resolve_cache_dir",
]
