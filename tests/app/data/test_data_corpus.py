"""load_documents: the stdlib corpus, local .txt/.jsonl files, Hugging Face names, and errors."""

import json
import sys
import types
from pathlib import Path

import pytest

from blockllm.app.data import DEFAULT_SOURCE, load_documents
from blockllm.app.data import corpus as corpus_mod


def test_default_source_is_stdlib():
    assert DEFAULT_SOURCE == "stdlib"


def test_stdlib_is_deterministic_and_truncated_exactly():
    first = load_documents("stdlib", max_chars=250_000)
    second = load_documents(max_chars=250_000)
    assert first == second
    assert sum(map(len, first)) == 250_000
    assert all(first)
    # Sorted by relative path: __future__.py comes before anything else.
    assert first[0].startswith('"""Record of phased-in incompatible language changes.')


def test_stdlib_excludes_tests_and_third_party_and_reads_topics():
    root = corpus_mod._stdlib_root()
    files = corpus_mod._stdlib_source_files(root)
    relative = [f.relative_to(root) for f in files]
    assert len(files) > 300
    assert relative == sorted(relative, key=lambda p: p.as_posix())
    banned = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not [p for p in relative if banned & set(p.parts)]
    assert Path("pydoc_data/topics.py") not in relative
    assert Path("json/decoder.py") in relative

    from pydoc_data.topics import topics

    docs = load_documents("stdlib")
    assert sum(map(len, docs)) > 5_000_000
    # The English topics come last, one document each, in sorted order.
    assert docs[-len(topics) :] == [topics[k] for k in sorted(topics)]


def test_max_chars_is_validated():
    with pytest.raises(ValueError, match="max_chars: 0"):
        load_documents("stdlib", max_chars=0)
    with pytest.raises(TypeError, match="max_chars"):
        load_documents("stdlib", max_chars=1.5)


def test_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond doc\r\n\r\nthird\n", encoding="utf-8")
    assert load_documents(str(path)) == ["first doc\nline two", "second doc", "third"]
    assert load_documents(path, max_chars=12) == ["first doc\nli"]


def test_txt_without_blank_lines_is_one_document(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a\nb\nc\n", encoding="utf-8")
    assert load_documents(str(path)) == ["a\nb\nc"]


def test_jsonl_reads_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(str(path)) == ["alpha", "beta"]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "ok"}', "{not json"], "line 2: invalid JSON"),
        (['{"text": "ok"}', '{"text": "ok"}', '{"body": "no text"}'], 'line 3: .*"text"'),
        (['{"text": 5}'], "line 1"),
        (['["text"]'], "line 1"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_documents(str(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_missing_file_is_named(tmp_path, suffix):
    path = tmp_path / f"nope{suffix}"
    with pytest.raises(FileNotFoundError, match=f"nope\\{suffix}"):
        load_documents(str(path))


@pytest.mark.parametrize(
    ("suffix", "content"), [(".txt", ""), (".txt", "\n \n\n"), (".jsonl", "\n")]
)
def test_empty_file_contains_no_text(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        load_documents(str(path))


def test_existing_path_of_other_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"neither a \.txt nor a \.jsonl"):
        load_documents(str(tmp_path))


def test_empty_and_non_string_sources_are_rejected():
    with pytest.raises(ValueError, match="Invalid source"):
        load_documents("")
    with pytest.raises(TypeError, match="Invalid source"):
        load_documents(42)


def test_hf_name_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError) as info:
        load_documents("someone/some-corpus")
    assert "pip install datasets" in str(info.value).splitlines()


def _fake_datasets(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_unreachable_hf_name_lists_local_forms(monkeypatch):
    def offline(name, split, streaming):
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(ValueError) as info:
        load_documents("wikitext")
    message = str(info.value)
    assert (
        "'wikitext' is neither a local .txt/.jsonl file nor a reachable Hugging Face dataset"
        in message
    )
    assert ".txt" in message and ".jsonl" in message and "'stdlib'" in message


def test_hf_dataset_text_column_is_read_and_streamed_when_limited(monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return [{"text": "hello world"}, {"text": ""}, {"text": "more text"}]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    assert load_documents("org/corpus") == ["hello world", "more text"]
    assert load_documents("org/corpus", max_chars=13) == ["hello world", "mo"]
    assert calls == [("org/corpus", "train", False), ("org/corpus", "train", True)]
