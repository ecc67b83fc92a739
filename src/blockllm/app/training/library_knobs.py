"""The library's BlockLLM knobs (default, help, built-in names), read without importing torch.

The run config takes each BlockLLM knob's default and help from :class:`blockllm.config.
BlockLLMConfig`, and the command line offers the built-in policy names of
:mod:`blockllm.selection` as choices. Importing either module loads torch, about 2 s on a small
CPU: more than everything else ``blockllm --help`` and ``blockllm pretrain --help`` do together.
So this module reads those values from the library's source files with :mod:`ast` instead. The
reader understands exactly the shapes the library writes them in (``name: type = _knob(default,
"help")`` in the class body, ``NAMES = {"name": Class, ...}`` and ``PARTIALS = (...)`` at module
level); when a file is missing (an install without sources) or uses another shape, it imports the
library instead: slower, never different. ``tests/app/training/test_training_library_knobs.py``
checks that both ways give the same values.
"""

from __future__ import annotations

import ast
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Which library registry holds each policy knob's built-in names: (module file, variable).
_REGISTRIES = {
    "trigger": ("selection/triggers.py", "TRIGGERS"),
    "selection": ("selection/packing.py", "SELECTION_RULES"),
    "score": ("selection/scorers.py", "SCORERS"),
    "rest": ("selection/rest_rules.py", "REST_RULES"),
    "partial": ("config.py", "PARTIALS"),
    "moment_dtype": ("config.py", "MOMENT_DTYPES"),
}
_CONFIG_FILE = "config.py"
_CONFIG_CLASS = "BlockLLMConfig"
_KNOB_CALL = "_knob"


@dataclass(frozen=True)
class Knob:
    """One field of ``BlockLLMConfig``.

    Attributes:
        default: Its default value.
        help: Its help text.
    """

    default: Any
    help: str


class _UnknownShape(Exception):
    """The source does not hold the value in a shape :func:`_read_source` knows."""


@functools.cache
def library_knobs() -> dict[str, Knob]:
    """Every ``BlockLLMConfig`` field, in declaration order, with its default and help."""
    try:
        return _read_knobs(_source(_CONFIG_FILE))
    except (OSError, SyntaxError, ValueError, _UnknownShape) as exc:
        logger.debug("Reading BlockLLMConfig by importing it (%s)", exc)
        from blockllm.config import BlockLLMConfig

        return {
            item.name: Knob(item.default, item.metadata["help"]) for item in BlockLLMConfig.fields()
        }


@functools.cache
def builtin_names(knob: str) -> tuple[str, ...]:
    """The built-in names a policy knob (``trigger``, ``selection``, ``score``, ``rest``,
    ``partial``, ``moment_dtype``) accepts, in the library's order."""
    filename, variable = _REGISTRIES[knob]
    try:
        return _read_names(_source(filename), variable)
    except (OSError, SyntaxError, ValueError, _UnknownShape) as exc:
        logger.debug("Reading %s by importing it (%s)", variable, exc)
        return _imported_names(knob)


def _imported_names(knob: str) -> tuple[str, ...]:
    from blockllm.config import MOMENT_DTYPES, PARTIALS
    from blockllm.selection.packing import SELECTION_RULES
    from blockllm.selection.rest_rules import REST_RULES
    from blockllm.selection.scorers import SCORERS
    from blockllm.selection.triggers import TRIGGERS

    registries = {
        "trigger": TRIGGERS, "selection": SELECTION_RULES, "score": SCORERS,
        "rest": REST_RULES, "partial": PARTIALS, "moment_dtype": MOMENT_DTYPES,
    }  # fmt: skip
    return tuple(registries[knob])


def _source(relative: str) -> ast.Module:
    import blockllm  # the package alone: its names load lazily, so this imports no torch

    path = Path(blockllm.__file__).parent / relative
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _read_knobs(tree: ast.Module) -> dict[str, Knob]:
    classes = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == _CONFIG_CLASS
    ]
    if len(classes) != 1:
        raise _UnknownShape(f"no single class {_CONFIG_CLASS}")
    knobs = {}
    for node in classes[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        call = node.value
        if not (
            isinstance(node.target, ast.Name)
            and isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == _KNOB_CALL
            and len(call.args) == 2
            and not call.keywords
        ):
            raise _UnknownShape(f"field at line {node.lineno} is not {_KNOB_CALL}(default, help)")
        # literal_eval raises ValueError on anything but a literal (a named constant, a call).
        default, help_text = (ast.literal_eval(arg) for arg in call.args)
        if not isinstance(help_text, str):
            raise _UnknownShape(f"help of {node.target.id} is not a string")
        knobs[node.target.id] = Knob(default, help_text)
    if not knobs:
        raise _UnknownShape(f"{_CONFIG_CLASS} has no fields")
    return knobs


def _read_names(tree: ast.Module, variable: str) -> tuple[str, ...]:
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign) and node.value is not None
            else []
        )
        if not any(isinstance(target, ast.Name) and target.id == variable for target in targets):
            continue
        value = node.value
        if isinstance(value, ast.Dict):  # a registry: {"name": Class, ...}
            keys = value.keys
        elif isinstance(value, (ast.Tuple, ast.List)):  # a tuple of names
            keys = value.elts
        else:
            raise _UnknownShape(f"{variable} is neither a dict nor a tuple literal")
        names = tuple(ast.literal_eval(key) for key in keys if key is not None)
        if len(names) != len(keys) or not all(isinstance(name, str) for name in names):
            raise _UnknownShape(f"{variable} has keys that are not string literals")
        return names
    raise _UnknownShape(f"no assignment to {variable}")


__all__ = ["Knob", "builtin_names", "library_knobs"]
