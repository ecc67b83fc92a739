"""Argument checks shared by ``blockllm.app.data`` and ``blockllm.app.models``.

Every message names the argument and the value it got, in the same shape as the optimizer's own
checks (``Invalid <name>: <value> ...``), so a typo in a CLI flag is reported where it was made.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``.

    Args:
        name: The argument's name, quoted in the error message.
        value: What the caller passed.
        minimum: The smallest accepted value.

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` counts as not an integer, since
            ``True`` as a batch size is always a mistake).
        ValueError: ``value`` is below ``minimum``.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {minimum})")
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int) -> int | None:
    """Like :func:`check_int`, but ``None`` passes through (it means "no limit")."""
    if value is None:
        return None
    return check_int(name, value, minimum=minimum)


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a float if it lies strictly between 0 and 1.

    Args:
        name: The argument's name, quoted in the error message.
        value: What the caller passed.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN or outside the open interval (0, 1).
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__} {value!r}")
    if math.isnan(value) or not 0.0 < value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be strictly between 0 and 1)")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise list them in the error.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r} (choose from {listed})")
    return value
