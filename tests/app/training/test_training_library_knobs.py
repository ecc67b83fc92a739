"""The BlockLLM knobs read from the library's source equal the library's own values."""

import ast

import pytest

from blockllm.app.training import library_knobs as reader
from blockllm.config import PARTIALS, BlockLLMConfig
from blockllm.selection.packing import SELECTION_RULES
from blockllm.selection.rest_rules import REST_RULES
from blockllm.selection.scorers import SCORERS
from blockllm.selection.triggers import TRIGGERS

REGISTRIES = {
    "trigger": tuple(TRIGGERS),
    "selection": tuple(SELECTION_RULES),
    "score": tuple(SCORERS),
    "rest": tuple(REST_RULES),
    "partial": tuple(PARTIALS),
}


def _imported_knobs():
    return {
        item.name: reader.Knob(item.default, item.metadata["help"])
        for item in BlockLLMConfig.fields()
    }


def test_source_reading_matches_the_imported_library():
    # Read directly, not through the cached functions: a fallback must not hide a reader bug.
    assert reader._read_knobs(reader._source("config.py")) == _imported_knobs()
    for knob, names in REGISTRIES.items():
        filename, variable = reader._REGISTRIES[knob]
        assert reader._read_names(reader._source(filename), variable) == names, knob


def test_cached_values_match_the_imported_library():
    assert reader.library_knobs() == _imported_knobs()
    assert list(reader.library_knobs()) == [item.name for item in BlockLLMConfig.fields()]
    for knob, names in REGISTRIES.items():
        assert reader.builtin_names(knob) == names


def test_unreadable_or_unknown_source_falls_back_to_importing(monkeypatch):
    def missing(relative):
        raise OSError(f"no {relative}")

    monkeypatch.setattr(reader, "_source", missing)
    reader.library_knobs.cache_clear()
    reader.builtin_names.cache_clear()
    try:
        assert reader.library_knobs() == _imported_knobs()
        assert reader.builtin_names("trigger") == REGISTRIES["trigger"]
    finally:
        reader.library_knobs.cache_clear()
        reader.builtin_names.cache_clear()


@pytest.mark.parametrize(
    "source",
    [
        "class BlockLLMConfig:\n    sparsity: float = _knob(DEFAULT, 'help')\n",
        "class BlockLLMConfig:\n    sparsity: float = field(default=0.9)\n",
        "class BlockLLMConfig:\n    sparsity: float = _knob(0.9, help='h')\n",
        "class Other:\n    sparsity: float = _knob(0.9, 'h')\n",
    ],
)
def test_shapes_the_reader_does_not_know_are_refused(source):
    with pytest.raises((reader._UnknownShape, ValueError)):
        reader._read_knobs(ast.parse(source))


def test_registry_shapes_the_reader_does_not_know_are_refused():
    for source in ("TRIGGERS = dict(loss=A)\n", "TRIGGERS = {**BASE}\n", "OTHER = {'a': A}\n"):
        with pytest.raises(reader._UnknownShape):
            reader._read_names(ast.parse(source), "TRIGGERS")
