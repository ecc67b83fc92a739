"""docs/cli.md's flag table states the defaults that `blockllm pretrain|finetune --help` shows."""

import argparse
import re
from pathlib import Path

import pytest

from blockllm.app.cli.main import build_parser
from blockllm.app.training.run_config import defaults_for

DOCS = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
# Flags whose default the table describes in words instead of a value.
DESCRIBED = {"--cache-dir", "--threads", "--output-dir", "--help"}


def _docs_defaults() -> dict[str, str]:
    """flag -> the text that states its default: its table row's cell, or the "only" paragraph."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Flags shared by `pretrain` and `finetune`", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `--") and len(cells) >= 3:
            for flag in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                found[flag] = cells[1]
    only = section.split("Pretrain only:", 1)[1]
    for flag in re.findall(r"`(--[a-z0-9-]+)`", only):
        found.setdefault(flag, only)
    return found


def _spellings(value) -> set[str]:
    """How the docs may write a default value."""
    if isinstance(value, bool):
        return {"on" if value else "off"}
    if value is None:
        return {"none", "all"}
    if isinstance(value, float):
        short = re.sub(
            r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], f"{value:.0e}"
        )
        spelled = {repr(value), f"{value:g}", short}
        return spelled | ({str(int(value))} if value.is_integer() else set())
    return {str(value)}


def _states(text: str, value) -> bool:
    return any(
        re.search(rf"(?<![\w.-]){re.escape(spelling)}(?![\w-]|\.\d)", text)
        for spelling in _spellings(value)
    )


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_the_flag_table_states_every_default_of_the_help(command):
    parser = build_parser()
    subparser = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices[command]
    documented = _docs_defaults()
    defaults = defaults_for(command)
    wrong = []
    for action in subparser._actions:
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if not flags or flags[0] in DESCRIBED:
            continue
        names = [flags[0], *(f"--no-{flag[2:]}" for flag in flags)]
        text = next((documented[name] for name in names if name in documented), None)
        if text is None:
            wrong.append(f"{flags[0]} is missing")
            continue
        value = action.default
        if value is argparse.SUPPRESS:  # a run-config flag (the command's default) or --log-level
            value = (
                defaults[action.dest]
                if action.dest in defaults
                else parser.get_default(action.dest)
            )
        if isinstance(action, argparse._StoreTrueAction):
            value = False
        if not _states(text, value):
            wrong.append(f"{flags[0]}: {value!r} not in {text!r}")
    assert wrong == []
