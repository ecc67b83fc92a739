"""Fixtures for the data tests: small corpora and a small tokenizer, built once per session."""

import os

# Before transformers/huggingface_hub are imported: a hub lookup must fail at once, never retry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from blockllm.app.data import load_documents, train_or_load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def stdlib_slice():
    """The first 300k characters of the standard-library corpus."""
    return load_documents("stdlib", max_chars=300_000)


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_slice, tmp_path_factory):
    """A 1024-token BPE trained on ``stdlib_slice`` (well under a second)."""
    return train_or_load_tokenizer(stdlib_slice, 1024, tmp_path_factory.mktemp("tok"))
