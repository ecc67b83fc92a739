"""Pretraining workload: a Llama preset from scratch on a corpus, next-token loss, perplexity."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from blockllm.app.training.metrics import perplexity
from blockllm.app.training.workloads.workload import AutocastFactory, Batch, to_device

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

logger = logging.getLogger(__name__)

# The train/eval split is drawn with a fixed seed, not the run's: runs with different seeds (or
# methods) are then scored on the same held-out blocks.
SPLIT_SEED = 0


class LanguageModelingWorkload:
    """Corpus -> byte-level BPE -> packed blocks -> a randomly initialised Llama preset.

    Args:
        config: The run config (``data``, ``max_chars``, ``vocab_size``, ``seq_len`` ...).
        cache_dir: Where the trained tokenizer is cached.
    """

    def __init__(self, config: RunConfig, cache_dir: Path) -> None:
        from blockllm.app.data import build_lm_splits, load_documents, train_or_load_tokenizer
        from blockllm.app.models.presets import build_llama, count_parameters

        started = time.perf_counter()
        documents = load_documents(config.data, max_chars=config.max_chars)
        self.tokenizer = train_or_load_tokenizer(
            documents, config.vocab_size, Path(cache_dir) / "tokenizers"
        )
        splits = build_lm_splits(
            documents, self.tokenizer, config.seq_len, eval_fraction=config.eval_fraction,
            seed=SPLIT_SEED, max_tokens=config.max_tokens,
        )  # fmt: skip
        del documents
        needed = config.batch_size
        if splits.train.shape[0] < needed:
            raise ValueError(
                f"The corpus gives {splits.train.shape[0]} training blocks of {config.seq_len + 1} "
                f"tokens, fewer than one batch of {needed}; use more text or a smaller "
                "--batch-size/--seq-len"
            )
        self.train_blocks = splits.train
        self.eval_blocks = splits.eval
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.eval_batches = config.eval_batches
        self.model = build_llama(
            config.model,
            vocab_size=len(self.tokenizer),
            max_seq_len=config.seq_len,
            seed=config.seed,
        )
        self.info: dict[str, Any] = {
            "num_parameters": count_parameters(self.model),
            "vocab_size": len(self.tokenizer),
            "train_tokens": int(self.train_blocks.numel()),
            "eval_tokens": int(self.eval_blocks[:, 1:].numel()),
            "setup_seconds": round(time.perf_counter() - started, 3),
        }
        logger.info(
            "Pretraining data: %d train / %d eval blocks of %d tokens, vocab %d (%.1f s)",
            self.train_blocks.shape[0], self.eval_blocks.shape[0], config.seq_len,
            len(self.tokenizer), self.info["setup_seconds"],
        )  # fmt: skip

    def train_batch(self, index: int) -> Batch:
        from blockllm.app.data import batch_for_step

        return {"blocks": batch_for_step(self.train_blocks, index, self.batch_size, seed=self.seed)}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        blocks = batch["blocks"]
        inputs, targets = blocks[:, :-1], blocks[:, 1:]
        logits = model(input_ids=inputs).logits
        # Our own loss on block[1:] instead of HF's labels=..., which would shift inside the
        # sequence and drop one prediction per block. cross_entropy runs in fp32 under autocast.
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, targets.numel()

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, device: torch.device, autocast: AutocastFactory
    ) -> dict[str, float]:
        """Mean next-token loss over the first ``eval_batches`` batches of the eval split, in order."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        blocks = self.eval_blocks
        limit = blocks.shape[0]
        if self.eval_batches:
            limit = min(limit, self.eval_batches * self.batch_size)
        for start in range(0, limit, self.batch_size):
            batch = to_device(
                {"blocks": blocks[start : min(start + self.batch_size, limit)]}, device
            )
            with autocast():
                loss, tokens = self.loss(model, batch)
            total += loss.double().cpu() * tokens
            count += tokens
        eval_loss = float(total / count)
        return {"eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)}


__all__ = ["SPLIT_SEED", "LanguageModelingWorkload"]
