"""Pack a corpus into fixed-length token blocks and serve them as reproducible batches.

Documents are tokenized, each followed by EOS, concatenated into one stream and cut into blocks of
``seq_len + 1`` tokens, so a block gives ``seq_len`` inputs and their ``seq_len`` next-token
labels with no padding. :func:`batch_for_step` is a pure function of the step number: a run
resumed from a checkpoint at step N sees exactly the batches an uninterrupted run would have seen,
without any sampler state to save.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from blockllm.app.checks import check_fraction, check_int, check_optional_int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Documents are tokenized this many at a time: big enough for the fast tokenizer's thread pool,
# small enough that the Python lists of ids it returns stay a few MB.
_ENCODE_BATCH = 256


@dataclass
class LMSplits:
    """Train and eval blocks for next-token prediction.

    Attributes:
        train: int64 tensor ``[n_train_blocks, seq_len + 1]``.
        eval: int64 tensor ``[n_eval_blocks, seq_len + 1]``; no block is in both.

    For a batch ``b`` of blocks the model's inputs are ``b[:, :-1]`` and its labels ``b[:, 1:]``.
    """

    train: torch.Tensor
    eval: torch.Tensor


def build_lm_splits(
    documents: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    eval_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | None = None,
) -> LMSplits:
    """Tokenize ``documents`` into blocks of ``seq_len + 1`` tokens and split them train/eval.

    Each document is encoded without special tokens and followed by the tokenizer's EOS, the
    results are concatenated, and the stream is cut into whole blocks (the tail that does not fill
    a block is dropped). ``round(eval_fraction * n_blocks)`` blocks, at least one, chosen by a
    permutation seeded with ``seed``, become the eval split; both splits keep corpus order.

    Args:
        documents: The texts, e.g. from :func:`blockllm.app.data.load_documents`.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        seq_len: Tokens per training sequence (each block holds one more, for the labels).
        eval_fraction: Share of blocks held out for evaluation, strictly between 0 and 1.
        seed: Seed of the train/eval split.
        max_tokens: If given, only the first ``max_tokens`` tokens of the stream are used.

    Returns:
        The two splits as int64 tensors.

    Raises:
        ValueError: ``seq_len`` < 1, ``eval_fraction`` outside (0, 1), ``max_tokens`` < 2, the
            tokenizer has no EOS token, or the text yields fewer than 2 blocks.
        TypeError: An argument has the wrong type.
    """
    seq_len = check_int("seq_len", seq_len, minimum=1)
    eval_fraction = check_fraction("eval_fraction", eval_fraction)
    seed = check_int("seed", seed, minimum=0)
    max_tokens = check_optional_int("max_tokens", max_tokens, minimum=2)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(f"Invalid tokenizer: {type(tokenizer).__name__} has no eos_token_id")

    stream = _token_stream(documents, tokenizer, eos_id, max_tokens)
    width = seq_len + 1
    n_blocks = stream.numel() // width
    if n_blocks < 2:
        raise ValueError(
            f"The text gives {stream.numel()} tokens, fewer than the 2 blocks of seq_len + 1 = "
            f"{width} tokens needed for a train and an eval split; use more text or a smaller seq_len"
        )
    blocks = stream[: n_blocks * width].view(n_blocks, width)

    n_eval = min(max(1, round(eval_fraction * n_blocks)), n_blocks - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_blocks, generator=generator)
    # Sorting keeps each split in corpus order; batch_for_step does the shuffling.
    eval_idx = order[:n_eval].sort().values
    train_idx = order[n_eval:].sort().values
    splits = LMSplits(train=blocks[train_idx], eval=blocks[eval_idx])
    logger.info(
        "Packed %d tokens into %d train and %d eval blocks of %d tokens (%d tail tokens dropped)",
        stream.numel(),
        len(train_idx),
        n_eval,
        width,
        stream.numel() - n_blocks * width,
    )
    return splits


def _token_stream(
    documents: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    max_tokens: int | None,
) -> torch.Tensor:
    """Encode ``documents`` in batches into one int64 stream, EOS after each document."""
    pieces: list[torch.Tensor] = []
    total = 0
    eos = torch.tensor([eos_id], dtype=torch.int64)
    for start in range(0, len(documents), _ENCODE_BATCH):
        batch = list(documents[start : start + _ENCODE_BATCH])
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(torch.tensor(ids, dtype=torch.int64))
            pieces.append(eos)
            total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    stream = torch.cat(pieces)
    return stream[:max_tokens] if max_tokens is not None else stream


def batch_for_step(
    blocks: torch.Tensor,
    step: int,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Return this rank's batch for global step ``step``; a pure function of its arguments.

    Epoch ``e`` visits the blocks in the order of a permutation seeded with ``seed + e``, cut into
    global batches of ``batch_size * world_size`` blocks; the last, incomplete global batch of an
    epoch is skipped, so every block is seen at most once per epoch (exactly once when the number
    of blocks is a multiple of the global batch). Rank ``r`` gets slice ``r`` of the global batch,
    so ranks never share a block within a step.

    Args:
        blocks: ``[n_blocks, seq_len + 1]`` tensor, e.g. ``LMSplits.train``.
        step: Global optimizer step, from 0 (the same on every rank).
        batch_size: Blocks per rank per step.
        seed: Base seed of the epoch permutations.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of data-parallel processes.

    Returns:
        A new ``[batch_size, seq_len + 1]`` tensor (a copy, safe to modify).

    Raises:
        ValueError: A count is out of range, or the global batch is larger than ``blocks``.
        TypeError: An argument has the wrong type.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() < 1:
        raise TypeError(
            f"Invalid blocks: expected a tensor with a block dimension, got {type(blocks).__name__}"
        )
    step = check_int("step", step, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"Invalid rank: {rank} (must be < world_size={world_size})")
    n_blocks = blocks.shape[0]
    global_batch = batch_size * world_size
    if global_batch > n_blocks:
        raise ValueError(
            f"Invalid batch_size: {batch_size} x world_size {world_size} = {global_batch} blocks per "
            f"step, but there are only {n_blocks} blocks; lower batch_size or use more text"
        )

    steps_per_epoch = n_blocks // global_batch
    epoch, index = divmod(step, steps_per_epoch)
    order = _permutation(n_blocks, seed + epoch)
    start = index * global_batch + rank * batch_size
    return blocks[order[start : start + batch_size]]


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> torch.Tensor:
    # Cached because consecutive steps share an epoch; a few entries cover a train and an eval
    # stream. Callers only index with it, never modify it.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
