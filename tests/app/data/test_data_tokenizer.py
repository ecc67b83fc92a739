"""train_or_load_tokenizer: byte-level BPE, exact round trips, content-hash cache."""

import pytest
import transformers

from blockllm.app.data import EOS_TOKEN, train_or_load_tokenizer
from blockllm.app.data import tokenizer as tokenizer_mod

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "class Foo:\n    '''A docstring.'''\n    x = [1, 2, 3]  # comment\n" * 10,
]


def _cache_entries(path):
    return sorted(p.name for p in path.iterdir())


def test_special_token_is_bos_eos_and_pad(small_tokenizer):
    tok = small_tokenizer
    assert len(tok) == 1024
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id
    # No special token is added implicitly.
    assert tok.eos_token_id not in tok("hello world")["input_ids"]


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x  + 1 ;  # trailing  \n\n",
        " leading space, punctuation , spacing .",
        "unicode: héllo wörld, 世界, emoji 🙂, zero\u200bwidth",
        "\x00\x01 control bytes and \r\n windows newlines",
    ],
)
def test_round_trip_is_exact(small_tokenizer, text):
    ids = small_tokenizer(text)["input_ids"]
    assert small_tokenizer.decode(ids) == text


def test_training_is_deterministic(stdlib_slice, tmp_path):
    a = train_or_load_tokenizer(stdlib_slice, 1024, tmp_path / "a")
    b = train_or_load_tokenizer(stdlib_slice, 1024, tmp_path / "b")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_second_call_is_served_from_cache(tmp_path, monkeypatch):
    first = train_or_load_tokenizer(DOCS, 300, tmp_path)
    entries = _cache_entries(tmp_path)
    assert len(entries) == 1 and entries[0].startswith("tokenizer-")
    stamp = (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained although it is cached")

    monkeypatch.setattr(tokenizer_mod, "_train_bpe", no_training)
    second = train_or_load_tokenizer(list(DOCS), 300, str(tmp_path))
    assert second.get_vocab() == first.get_vocab()
    assert _cache_entries(tmp_path) == entries
    assert (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns == stamp


def test_changed_data_or_vocab_retrains(tmp_path):
    train_or_load_tokenizer(DOCS, 300, tmp_path)
    train_or_load_tokenizer(DOCS + ["one more document"], 300, tmp_path)
    train_or_load_tokenizer(DOCS, 310, tmp_path)
    # Same text split differently must not collide either.
    train_or_load_tokenizer(["ab", "c"], 300, tmp_path / "split")
    train_or_load_tokenizer(["a", "bc"], 300, tmp_path / "split")
    assert len([e for e in _cache_entries(tmp_path) if e.startswith("tokenizer-")]) == 3
    assert len(_cache_entries(tmp_path / "split")) == 2


def test_failed_write_leaves_no_cache(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_or_load_tokenizer(DOCS, 300, tmp_path / "cold")
    # Neither a final folder nor a leftover staging folder.
    assert _cache_entries(tmp_path / "cold") == []


def test_small_corpus_warns_about_smaller_vocab(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="blockllm.app.data.tokenizer"):
        tok = train_or_load_tokenizer(["tiny corpus"], 5000, tmp_path)
    assert len(tok) < 5000
    assert "fewer than vocab_size=5000" in caplog.text


@pytest.mark.parametrize(
    ("documents", "vocab_size", "error", "match"),
    [
        (DOCS, 100, ValueError, "vocab_size: 100"),
        (DOCS, "8k", TypeError, "vocab_size"),
        (["", ""], 300, ValueError, "no text"),
        ("just a string", 300, TypeError, "documents"),
    ],
)
def test_bad_arguments(tmp_path, documents, vocab_size, error, match):
    with pytest.raises(error, match=match):
        train_or_load_tokenizer(documents, vocab_size, tmp_path)
