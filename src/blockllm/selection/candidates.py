"""The candidate tensors of one optimizer: which parameters BlockLLM may select, by index."""

from __future__ import annotations

import re
from typing import Any

import torch

from blockllm.selection.names import NameMatcher, Pattern


class CandidateSet:
    """Parameters that may be selected, in param-group order, with their names.

    A parameter the user froze (``requires_grad=False``) is never a candidate and never touched.
    One matched by ``exclude`` (or not by ``include``) is frozen, but only by
    :meth:`freeze_excluded`, which the optimizer calls once every check has passed: a constructor
    that raises leaves the model exactly as it was.

    Candidates matched by ``always_adam`` are *pinned*: always updated (with Adam), outside the
    budget and the selection. ``always_adam="auto"`` pins what every recipe of the field trains
    with Adam (FRUGAL, SCALE, LISA): vectors (norm gains, biases) and the vocabulary matrices,
    recognised by the names language models give them (:data:`VOCABULARY_NAMES`); a model
    that names them otherwise needs the names given explicitly.

    Args:
        include, exclude, always_adam: the optimizer's name patterns (see :class:`NameMatcher`).
        aliases: a tensor's kept name -> the other names it was given (tied weights).
    """

    def __init__(
        self,
        include: Pattern,
        exclude: Pattern,
        aliases: dict[str, list[str]],
        always_adam: Pattern = None,
    ) -> None:
        self.include = NameMatcher("include", include)
        self.exclude = NameMatcher("exclude", exclude)
        self.auto_pin = always_adam == "auto"
        self.always_adam = NameMatcher("always_adam", None if self.auto_pin else always_adam)
        self.aliases = aliases
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.pinned: frozenset[int] = frozenset()
        self.excluded_names: list[str] = []
        self._index: dict[int, int] = {}
        self._to_freeze: list[tuple[str, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.params)

    def check_patterns(self, names: list[str]) -> None:
        """Raise ``NoMatchingParamsError`` for an include/exclude/always_adam pattern that matches
        nothing (``always_adam="auto"`` is no pattern: it never raises)."""
        every_name = names + [alias for more in self.aliases.values() for alias in more]
        for matcher in (self.include, self.exclude, self.always_adam):
            if matcher.active:
                matcher.check_all_used(every_name)

    def register(self, group: dict[str, Any]) -> None:
        """Add the candidates of a normalised param group (see :mod:`blockllm.optim.params`)."""
        for name, param in zip(group["param_names"], group["params"]):
            if not param.requires_grad:
                continue  # frozen by the user: never a candidate, never touched
            names = [name, *self.aliases.get(name, [])]
            excluded = self.exclude.matches(names)
            if self.include.active and not self.include.matches(names):
                excluded = True
            if excluded:
                self._to_freeze.append((name, param))
                continue
            if param.is_complex():
                raise TypeError(
                    f"Invalid params: {name!r} is complex ({param.dtype}); BlockLLM supports real "
                    "floating-point parameters only"
                )
            if self.always_adam.matches(names) or (self.auto_pin and auto_pinned(names, param.ndim)):
                self.pinned = self.pinned | {len(self.params)}
            self._index[id(param)] = len(self.params)
            self.params.append(param)
            self.names.append(name)

    def freeze_excluded(self) -> None:
        """Freeze the excluded tensors registered since the last call."""
        for name, param in self._to_freeze:
            param.requires_grad_(False)
            self.excluded_names.append(name)
        self._to_freeze.clear()

    def index(self, param: torch.Tensor) -> int | None:
        """The candidate index of ``param``, or None when it is no candidate."""
        return self._index.get(id(param))

    @property
    def vocabulary(self) -> list[int]:
        """Candidates named like an embedding or an output head (:data:`VOCABULARY_NAMES`)."""
        found = []
        for index, name in enumerate(self.names):
            names = [name, *self.aliases.get(name, [])]
            if any(VOCABULARY_NAMES.fullmatch(alias) for alias in names):
                found.append(index)
        return found

    @property
    def numel(self) -> int:
        """Coordinates of the candidates that compete for the budget (the pinned do not)."""
        return sum(self.sizes)

    @property
    def sizes(self) -> list[int]:
        """Coordinates of each candidate; 0 for a pinned one (it takes no budget)."""
        return [0 if i in self.pinned else p.numel() for i, p in enumerate(self.params)]

    @property
    def row_sizes(self) -> list[int]:
        """Coordinates per row (``numel // shape[0]``) of each candidate; 1 for vectors."""
        return [
            param.numel() // param.shape[0] if param.ndim >= 2 and param.shape[0] else 1
            for param in self.params
        ]


#: The input embedding and output head of the common language-model families (Llama, Mistral,
#: Qwen, Gemma: ``embed_tokens``/``lm_head``; GPT-2: ``wte``; GPT-NeoX: ``embed_in``/``embed_out``;
#: BERT: ``word_embeddings``; Llama's original code: ``tok_embeddings``/``output``).
VOCABULARY_NAMES = re.compile(
    r"(.*\.)?(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|embed_out|output)"
    r"\.weight"
)


def auto_pinned(names: list[str], ndim: int) -> bool:
    """Whether ``always_adam="auto"`` pins a tensor of ``ndim`` dimensions known by ``names``:
    a vector, or a vocabulary matrix. The optimizer and ``blockllm estimate`` both ask here."""
    return ndim <= 1 or any(VOCABULARY_NAMES.fullmatch(name) for name in names)


__all__ = ["VOCABULARY_NAMES", "CandidateSet", "auto_pinned"]
