"""Text corpora for pretraining: the Python standard library, local files, or a Hugging Face dataset.

The default, ``"stdlib"``, needs no download and no install: every Python carries its standard
library's sources (about 13 MB of code) and the English reference docs in ``pydoc_data`` (about
0.8 MB), so the quick start and the tests run on a fresh offline machine.
"""

from __future__ import annotations

import logging
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockllm.app.checks import check_optional_int
from blockllm.app.data.jsonl import iter_text_records
from blockllm.app.deps import require_module

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "stdlib"

# Folder names never read from the standard library: the test suites (huge, repetitive and full of
# deliberately broken code), third-party packages, and bytecode caches.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)

# pydoc_data/topics.py is one huge dict literal of English text; it is read as prose (one document
# per topic) instead of as a Python file, so it is not counted twice.
_TOPICS_FILE = Path("pydoc_data") / "topics.py"

_VALID_FORMS = (
    f"{DEFAULT_SOURCE!r} (the Python standard library), a path to a .txt file (documents separated "
    'by blank lines), or a path to a .jsonl file (one JSON object with a "text" field per line)'
)

# One or more blank (or whitespace-only) lines end a document.
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")


def load_documents(
    source: str | os.PathLike[str] = DEFAULT_SOURCE, *, max_chars: int | None = None
) -> list[str]:
    """Load a list of text documents for language-model pretraining.

    Args:
        source: Where the text comes from:

            * ``"stdlib"``: the standard library's ``.py`` files (one document each, sorted by
              path; test suites, ``site-packages`` and ``__pycache__`` excluded), then the topics
              of ``pydoc_data.topics`` (one document each, sorted by topic name).
            * a path ending in ``.txt``: documents separated by blank lines (the whole file is one
              document if it has none).
            * a path ending in ``.jsonl``: one JSON object per line, its ``"text"`` field is the
              document; blank lines are skipped.
            * any other string that is not an existing path: a Hugging Face dataset name, whose
              ``"train"`` split and ``"text"`` column are read (needs ``datasets`` and the Hub).
        max_chars: If given, stop once this many characters are collected; the last document is
            cut so that the total is exactly ``max_chars``. Documents are taken in the order
            above, so the same ``max_chars`` always gives the same slice.

    Returns:
        The documents, in a deterministic order, none of them empty.

    Raises:
        FileNotFoundError: ``source`` ends in ``.txt``/``.jsonl`` but does not exist.
        ValueError: The file has no text, a JSONL line is not valid JSON or has no string
            ``"text"``, ``source`` is an existing path of another kind, the dataset cannot be
            loaded, or ``max_chars`` is below 1.
        ImportError: ``source`` names a Hugging Face dataset and ``datasets`` is not installed.
        TypeError: ``source`` is not a string or path, or ``max_chars`` is not an int.
    """
    max_chars = check_optional_int("max_chars", max_chars, minimum=1)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"Invalid source: expected a str, got {type(source).__name__} {source!r}")
    if not source:
        raise ValueError(f"Invalid source: {source!r} (use {_VALID_FORMS})")

    if source == DEFAULT_SOURCE:
        documents = _take(_stdlib_documents(), max_chars)
        origin = "the Python standard library"
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix in (".txt", ".jsonl"):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Text source {str(path)!r} does not exist (or is not a file)"
                )
            reader = _txt_documents if suffix == ".txt" else _jsonl_documents
            documents = _take(reader(path), max_chars)
            if not documents:
                raise ValueError(f"Text source {str(path)!r} contains no text")
        elif path.exists():
            raise ValueError(
                f"Invalid source: {source!r} is neither a .txt nor a .jsonl file (use {_VALID_FORMS})"
            )
        else:
            documents = _take(_hf_documents(source, streaming=max_chars is not None), max_chars)
            if not documents:
                raise ValueError(f"Hugging Face dataset {source!r} contains no text")
        origin = repr(source)

    logger.info(
        "Loaded %d documents (%d characters) from %s",
        len(documents),
        sum(map(len, documents)),
        origin,
    )
    return documents


def _take(documents: Iterable[str], max_chars: int | None) -> list[str]:
    """Collect non-empty documents until ``max_chars`` characters, cutting the last one."""
    taken: list[str] = []
    total = 0
    for doc in documents:
        if not doc:
            continue
        if max_chars is not None and total + len(doc) >= max_chars:
            taken.append(doc[: max_chars - total])
            break
        taken.append(doc)
        total += len(doc)
    return taken


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_source_files(root: Path) -> list[Path]:
    """All ``.py`` files under ``root``, minus the excluded folders, sorted by relative path."""
    files: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending (site-packages alone can be gigabytes).
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        files.extend(Path(folder) / f for f in filenames if f.endswith(".py"))
    # Sort on the relative POSIX path so the order does not depend on where Python is installed.
    files = [f for f in files if f.relative_to(root) != _TOPICS_FILE]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[str]:
    """Yield the standard library's sources, then its pydoc topics (lazily, for ``max_chars``)."""
    root = _stdlib_root()
    for path in _stdlib_source_files(root):
        try:
            # tokenize.open honours PEP 263 coding cookies, which plain open() would ignore.
            with tokenize.open(path) as handle:
                text = handle.read()
        except (OSError, SyntaxError, UnicodeDecodeError) as exc:
            logger.debug("Skipping unreadable stdlib file %s: %s", path, exc)
            continue
        yield text
    # Importing pydoc_data is cheap (one dict literal) and always possible: it ships with CPython.
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _txt_documents(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    for chunk in _BLANK_LINES.split(text.replace("\r\n", "\n")):
        chunk = chunk.strip("\n")
        if chunk.strip():
            yield chunk


def _jsonl_documents(path: Path) -> Iterator[str]:
    for _, record in iter_text_records(path):
        yield record["text"]


def _hf_documents(name: str, *, streaming: bool) -> Iterator[str]:
    """Yield the ``"text"`` column of a Hugging Face dataset's ``"train"`` split.

    With a character limit the dataset is streamed, so asking for a slice of a huge corpus does not
    download all of it first.
    """
    datasets = require_module("datasets", "pip install datasets", f"Loading the dataset {name!r}")
    try:
        dataset = datasets.load_dataset(name, split="train", streaming=streaming)
    except Exception as exc:  # datasets raises many unrelated exception types when offline
        raise ValueError(
            f"Invalid source: {name!r} is neither a local .txt/.jsonl file nor a reachable Hugging "
            f"Face dataset ({type(exc).__name__}: {exc}). Valid local forms: {_VALID_FORMS}"
        ) from exc
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "text" not in columns:
        raise ValueError(f"Hugging Face dataset {name!r} has no 'text' column (columns: {columns})")
    for row in dataset:
        text = row.get("text")
        if isinstance(text, str):
            yield text
