"""Reading JSON Lines files whose records carry a ``"text"`` field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_text_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` for each non-blank line of a JSONL file.

    Raises:
        ValueError: a line is not valid JSON, or not an object with a string ``"text"`` field;
            the message names the file and the line.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{str(path)!r} line {number}: expected a JSON object with a string "text" '
                    f"field, got {line.strip()[:80]!r}"
                )
            yield number, record
