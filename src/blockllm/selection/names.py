"""Name patterns: which parameters ``include``/``exclude`` (and other name-keyed options) mean."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from blockllm.errors import NoMatchingParamsError

Pattern = str | Sequence[str] | None


class NameMatcher:
    """Matches parameter names against an include/exclude specification.

    A single ``str`` is one regular expression matched with ``re.fullmatch``. A list holds exact
    names and suffixes: an entry matches a name equal to it, a name ending in ``"." + entry``, or,
    when the entry itself starts with ``"."`` (like ``".bias"``), any name ending in it.
    """

    def __init__(self, argument: str, spec: Pattern) -> None:
        self.argument = argument
        self.regex: re.Pattern[str] | None = None
        self.entries: list[str] = []
        if spec is None:
            return
        if isinstance(spec, str):
            try:
                self.regex = re.compile(spec)
            except re.error as err:
                raise ValueError(f"Invalid {argument}: {spec!r} is not a valid regex ({err})") from err
        elif isinstance(spec, Iterable):
            self.entries = list(spec)
            for entry in self.entries:
                if not isinstance(entry, str) or not entry:
                    raise TypeError(
                        f"Invalid {argument}: entries must be non-empty str, got {entry!r}"
                    )
        else:
            raise TypeError(
                f"Invalid {argument}: expected a regex str or a list of names, got "
                f"{type(spec).__name__}"
            )

    @property
    def active(self) -> bool:
        return self.regex is not None or bool(self.entries)

    def _entry_matches(self, entry: str, name: str) -> bool:
        if entry.startswith("."):
            return name.endswith(entry)
        return name == entry or name.endswith("." + entry)

    def matches(self, names: Sequence[str]) -> bool:
        """True when any of ``names`` (a tensor's name and its aliases) matches."""
        for name in names:
            if self.regex is not None and self.regex.fullmatch(name):
                return True
            if any(self._entry_matches(entry, name) for entry in self.entries):
                return True
        return False

    def check_all_used(self, all_names: Sequence[str]) -> None:
        """Raise :class:`NoMatchingParamsError` for a pattern or entry that matches nothing."""
        example = ", ".join(repr(n) for n in list(all_names)[:5])
        if self.regex is not None and not any(self.regex.fullmatch(n) for n in all_names):
            raise NoMatchingParamsError(
                f"Invalid {self.argument}: regex {self.regex.pattern!r} matches no parameter name "
                f"(names look like {example})"
            )
        for entry in self.entries:
            if not any(self._entry_matches(entry, n) for n in all_names):
                raise NoMatchingParamsError(
                    f"Invalid {self.argument}: {entry!r} matches no parameter name "
                    f"(names look like {example})"
                )
