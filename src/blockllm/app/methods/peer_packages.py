"""The third-party packages the peer methods need, and the error when one is missing.

The adapters themselves are one small module each (``lisa``, ``badam``, ``galore``, ``lora``,
``adamw8bit``); :mod:`blockllm.app.methods.peers` registers them by name and imports a module only
when its method is built, so a missing peer package costs nothing until that method is asked for.
The third-party packages sit behind ``pip install "blockllm[bench]"``; a missing one raises an
``ImportError`` whose last line is the exact ``pip install`` command.
"""

from __future__ import annotations

import importlib.util

from blockllm.app.deps import require_module

# method name -> (import name, install command), for the peers that need a package.
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "badam": ("badam", "pip install badam"),
    "galore": ("galore_torch", "pip install galore-torch"),
    "lora": ("peft", "pip install peft"),
    "adamw-8bit": ("bitsandbytes", "pip install bitsandbytes"),
}


def missing_message(method: str, module: str, pip_line: str) -> str:
    """The error text for a missing peer package; its last line is ``pip_line``."""
    return f"--optimizer {method} needs the package {module!r}, install it with:\n{pip_line}"


def missing_requirement(method: str) -> str | None:
    """The missing-package message for ``method``, or None when it can be built.

    Only the import system's lookup is used (nothing is imported), so the bench runner can
    decide in a millisecond which peers to skip.
    """
    requirement = REQUIREMENTS.get(method)
    if requirement is None:
        return None
    module, pip_line = requirement
    if importlib.util.find_spec(module) is None:
        return missing_message(method, module, pip_line)
    return None


def require_peer(method: str) -> object:
    """Import and return the package ``method`` needs.

    Raises:
        ImportError: it is not installed; the message's last line is the ``pip install`` line.
    """
    module, pip_line = REQUIREMENTS[method]
    return require_module(module, pip_line, f"--optimizer {method}")


__all__ = ["REQUIREMENTS", "missing_message", "missing_requirement", "require_peer"]
