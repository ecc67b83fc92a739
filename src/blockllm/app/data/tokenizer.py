"""A byte-level BPE tokenizer trained on the pretraining corpus, cached by content hash.

No pretrained tokenizer ships offline in a size that suits a from-scratch model, so one is trained
at start-up (a few seconds for the standard library corpus) and cached: the cache key covers the
documents' text and the vocabulary size, so a second run on the same data loads it at once and any
change of data retrains it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from blockllm.app.checks import check_int
from blockllm.app.deps import HF_PIP_LINE, require_module

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

#: The one special token; it separates documents and doubles as BOS, EOS and padding (GPT-2 style).
EOS_TOKEN = "<|endoftext|>"

# 256 byte symbols plus the special token: below this BPE cannot learn a single merge.
_MIN_VOCAB = 257

# Bump when the training recipe changes, so old caches are not served for the new recipe.
_RECIPE_VERSION = "bytebpe-v1"

# Documents are fed to the trainer in batches so that it can use every core.
_TRAIN_BATCH = 64


def train_or_load_tokenizer(
    documents: list[str], vocab_size: int, cache_dir: str | os.PathLike[str]
) -> PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer for ``documents``, training it only on a cache miss.

    The tokenizer is cached in ``cache_dir/tokenizer-<hash>/`` (a ``save_pretrained`` folder),
    where the hash covers the documents' text, their order and ``vocab_size``. The folder is
    written under a temporary name and renamed into place, so an interrupted run or two runs at
    once never leave a half-written cache behind.

    Args:
        documents: Training text; the same list always gives the same tokenizer.
        vocab_size: Target vocabulary size, special token included (at least 257). Small corpora
            may yield fewer tokens; a warning is logged then.
        cache_dir: Folder for the cache; created if missing.

    Returns:
        A ``PreTrainedTokenizerFast`` whose ``<|endoftext|>`` token is its BOS, EOS and pad token.
        It adds no special tokens by itself: ``tokenizer(text)`` is the plain BPE encoding.

    Raises:
        TypeError: ``documents`` is not a list of strings or ``vocab_size`` not an int.
        ValueError: ``documents`` holds no text or ``vocab_size`` is below 257.
        ImportError: ``tokenizers``/``transformers`` are not installed.
    """
    vocab_size = check_int("vocab_size", vocab_size, minimum=_MIN_VOCAB)
    if not isinstance(documents, (list, tuple)) or not all(isinstance(d, str) for d in documents):
        raise TypeError(
            f"Invalid documents: expected a list of str, got {type(documents).__name__}"
        )
    if not any(documents):
        raise ValueError("Invalid documents: the list contains no text")
    transformers = require_module("transformers", HF_PIP_LINE, "Building a tokenizer")

    cache_root = Path(cache_dir).expanduser()
    target = cache_root / f"tokenizer-{_cache_key(documents, vocab_size)}"
    if (target / "tokenizer.json").is_file():
        logger.info("Loading tokenizer from cache %s", target)
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(target))

    logger.info("Training a %d-token byte-level BPE on %d documents", vocab_size, len(documents))
    tokenizer = _wrap(transformers, _train_bpe(documents, vocab_size))
    learned = tokenizer.backend_tokenizer.get_vocab_size()
    if learned < vocab_size:
        logger.warning(
            "The corpus only supports %d tokens, fewer than vocab_size=%d; using %d",
            learned,
            vocab_size,
            learned,
        )
    _save_atomically(tokenizer, target)
    logger.info("Cached tokenizer in %s", target)
    # Reload what was saved, so a cache miss returns exactly the object a cache hit would.
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(target))


def _cache_key(documents: list[str], vocab_size: int) -> str:
    """Hash of the recipe version, ``vocab_size`` and every document (order included)."""
    digest = hashlib.sha256(f"{_RECIPE_VERSION}\0{vocab_size}\0{len(documents)}\0".encode())
    for doc in documents:
        data = doc.encode("utf-8", errors="surrogatepass")
        # The length prefix keeps ["ab", "c"] and ["a", "bc"] apart.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def _batches(documents: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(documents), _TRAIN_BATCH):
        yield documents[start : start + _TRAIN_BATCH]


def _train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """Train the raw ``tokenizers`` BPE model (GPT-2's byte-level scheme)."""
    tk = require_module("tokenizers", HF_PIP_LINE, "Training a tokenizer")
    bpe = tk.Tokenizer(tk.models.BPE())
    # add_prefix_space=False keeps encode/decode an exact round trip of the original bytes.
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seeding all 256 bytes means any input, even unseen scripts, encodes without <unk>.
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_batches(documents), trainer=trainer, length=len(documents))
    return bpe


def _wrap(transformers: ModuleType, bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Spaces before punctuation are real text in code; "cleaning" them would break round trips.
        clean_up_tokenization_spaces=False,
    )


def _save_atomically(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Write ``save_pretrained`` output to a temp folder beside ``target``, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        try:
            os.replace(staging, target)
        except OSError:
            # Another process renamed its identical copy first; theirs is as good as ours.
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
