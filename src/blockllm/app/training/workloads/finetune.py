"""Finetuning workloads: a sequence classifier, or a causal LM that answers with the label word.

* ``classification`` (MiniLM, or any encoder saved as a HF model directory): a classification
  head on the pooled output, cross-entropy on the label; accuracy on the held-out split.
* ``causal-lm`` (Gemma-3-270M, or any causal LM directory): text-to-label. The model reads
  ``"Tweet: <text>\\nSentiment:"`` and is trained to continue with ``" positive"``/``" negative"``
  (loss on the label tokens only). It is scored by comparing the label words' log-probabilities
  after the prompt, so accuracy needs no generation and no parsing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from blockllm.app.training.metrics import perplexity
from blockllm.app.training.workloads.workload import (
    AutocastFactory,
    Batch,
    Workload,
    example_indices,
    to_device,
)

if TYPE_CHECKING:
    from blockllm.app.training.run_config import RunConfig

logger = logging.getLogger(__name__)

# Eval batches may be larger than training ones: no activations are kept for backward.
_EVAL_BATCH_FACTOR = 2

# Prompt (prefix, suffix) around the input text, by task; other tasks use the generic one.
_PROMPTS = {"tweet-sentiment": ("Tweet: ", "\nSentiment:")}
_GENERIC_PROMPT = ("Text: ", "\nLabel:")
_CAUSAL_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_KNOWN_KINDS = {"minilm": "classification", "gemma-270m": "causal-lm"}


def resolve_task_kind(config: RunConfig) -> str:
    """``config.task_kind``, with ``auto`` decided by the model (a directory's ``architectures``)."""
    if config.task_kind != "auto":
        return config.task_kind
    if config.model in _KNOWN_KINDS:
        return _KNOWN_KINDS[config.model]
    config_file = Path(config.model).expanduser() / "config.json"
    try:
        architectures = (
            json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
        )
    except (OSError, ValueError):
        architectures = []
    if any(name.endswith(_CAUSAL_ARCHITECTURE_SUFFIXES) for name in architectures):
        return "causal-lm"
    return "classification"


def build_finetune_workload(config: RunConfig, cache_dir: Path) -> Workload:
    """The classification or text-to-label workload for ``config``."""
    from blockllm.app.data import load_task
    from blockllm.app.models.pretrained import load_finetune_model

    started = time.perf_counter()
    task = load_task(
        config.task, max_train=config.max_train_examples, max_eval=config.max_eval_examples,
        seed=config.seed,
    )  # fmt: skip
    kind = resolve_task_kind(config)
    model, tokenizer = load_finetune_model(
        config.model, task_kind=kind, num_labels=len(task.label_names), cache_dir=Path(cache_dir)
    )
    workload_class = ClassificationWorkload if kind == "classification" else TextToLabelWorkload
    workload = workload_class(config, task, model, tokenizer)
    workload.info["task_kind"] = kind
    workload.info["setup_seconds"] = round(time.perf_counter() - started, 3)
    return workload


def _count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def _pad(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length; return ``input_ids`` and ``attention_mask``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class ClassificationWorkload:
    """Sequence classification: ``model(input_ids, attention_mask, labels).loss``; accuracy."""

    def __init__(self, config: RunConfig, task: Any, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.label_names = list(task.label_names)

        # Tokenize once up front; batches then only pad (to their own longest row).
        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, truncation=True, max_length=config.seq_len)["input_ids"]

        self.train_ids = encode(task.train_texts)
        self.train_labels = list(task.train_labels)
        self.eval_ids = encode(task.eval_texts)
        self.eval_labels = list(task.eval_labels)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.info: dict[str, Any] = {
            "num_parameters": _count_parameters(model),
            "train_examples": len(self.train_ids),
            "eval_examples": len(self.eval_ids),
            "labels": self.label_names,
        }
        logger.info(
            "Classification: %d train / %d eval examples, %d labels",
            len(self.train_ids), len(self.eval_ids), len(self.label_names),
        )  # fmt: skip

    def _batch(self, ids: list[list[int]], labels: list[int]) -> Batch:
        input_ids, attention_mask = _pad(ids, self.pad_id, left=False)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor(labels),
        }

    def train_batch(self, index: int) -> Batch:
        chosen = example_indices(len(self.train_ids), index, self.batch_size, self.seed)
        return self._batch(
            [self.train_ids[i] for i in chosen], [self.train_labels[i] for i in chosen]
        )

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"]), int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, device: torch.device, autocast: AutocastFactory
    ) -> dict[str, float]:
        """Loss and accuracy over the whole held-out split."""
        size = self.batch_size * _EVAL_BATCH_FACTOR
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self.eval_ids), size):
            batch = to_device(
                self._batch(
                    self.eval_ids[start : start + size], self.eval_labels[start : start + size]
                ),
                device,
            )
            with autocast():
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        count = len(self.eval_ids)
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


class TextToLabelWorkload:
    """A causal LM learns to answer a prompt with the label word; scored by label likelihood.

    Sequences are left-padded so that every row ends with its label: the loss then needs the
    logits of the last ``max_label_len + 1`` positions only (``logits_to_keep``), which for a
    262k-token vocabulary (Gemma) is the difference between megabytes and gigabytes.
    """

    def __init__(self, config: RunConfig, task: Any, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.label_names = list(task.label_names)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # " positive" with its leading space: the word as it follows "Sentiment:" in running text.
        self.label_ids = [
            tokenizer(" " + name, add_special_tokens=False)["input_ids"]
            for name in self.label_names
        ]
        if any(not ids for ids in self.label_ids):
            raise ValueError(f"Invalid task labels: {self.label_names} (one encodes to no token)")
        self.max_label_len = max(len(ids) for ids in self.label_ids)
        firsts = [ids[0] for ids in self.label_ids]
        # When the labels' first tokens differ, one forward pass scores every label at once.
        self.first_token_scoring = len(set(firsts)) == len(firsts)
        prefix, suffix = _PROMPTS.get(config.task, _GENERIC_PROMPT)
        budget = config.seq_len - self.max_label_len
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if budget - len(suffix_ids) - len(bos) < 1:
            raise ValueError(
                f"Invalid seq_len: {config.seq_len} leaves no room for the text (raise --seq-len)"
            )

        def prompt(text: str) -> list[int]:
            body = tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
            return bos + body[: budget - len(suffix_ids) - len(bos)] + suffix_ids

        self.train_prompts = [prompt(text) for text in task.train_texts]
        self.train_labels = list(task.train_labels)
        self.eval_prompts = [prompt(text) for text in task.eval_texts]
        self.eval_labels = list(task.eval_labels)
        self.info: dict[str, Any] = {
            "num_parameters": _count_parameters(model),
            "train_examples": len(self.train_prompts),
            "eval_examples": len(self.eval_prompts),
            "labels": self.label_names,
            "label_tokens": self.label_ids,
        }
        logger.info(
            "Text-to-label: %d train / %d eval examples, labels %s -> tokens %s",
            len(self.train_prompts), len(self.eval_prompts), self.label_names, self.label_ids,
        )  # fmt: skip

    def _batch(self, prompts: list[list[int]], labels: list[int]) -> Batch:
        rows = [p + self.label_ids[label] for p, label in zip(prompts, labels, strict=True)]
        input_ids, attention_mask = _pad(rows, self.pad_id, left=True)
        # Tail mask: which of the last max_label_len positions are label tokens to predict.
        target_mask = torch.zeros((len(rows), self.max_label_len), dtype=torch.bool)
        for i, label in enumerate(labels):
            target_mask[i, self.max_label_len - len(self.label_ids[label]) :] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask,
                "labels": torch.tensor(labels)}  # fmt: skip

    def _tail_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits predicting the last ``max_label_len`` tokens: ``[batch, max_label_len, vocab]``."""
        mask = batch["attention_mask"]
        # Explicit positions: left padding must not shift where the real tokens sit.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = self.max_label_len + 1
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                        logits_to_keep=keep)  # fmt: skip
        except TypeError:  # an older architecture without logits_to_keep
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
        return out.logits[:, -keep:-1]

    def train_batch(self, index: int) -> Batch:
        chosen = example_indices(len(self.train_prompts), index, self.batch_size, self.seed)
        return self._batch(
            [self.train_prompts[i] for i in chosen], [self.train_labels[i] for i in chosen]
        )

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = self._tail_logits(model, batch).float()
        targets = batch["input_ids"][:, -self.max_label_len :]
        mask = batch["target_mask"]
        loss = F.cross_entropy(logits[mask], targets[mask])
        return loss, int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, device: torch.device, autocast: AutocastFactory
    ) -> dict[str, float]:
        """Label-token loss and label accuracy over the held-out split."""
        size = self.batch_size * _EVAL_BATCH_FACTOR
        loss_sum, loss_count, correct = 0.0, 0, 0
        for start in range(0, len(self.eval_prompts), size):
            prompts = self.eval_prompts[start : start + size]
            gold = self.eval_labels[start : start + size]
            batch = to_device(self._batch(prompts, gold), device)
            with autocast():
                logits = self._tail_logits(model, batch).float()
            targets = batch["input_ids"][:, -self.max_label_len :]
            mask = batch["target_mask"]
            loss_sum += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
            loss_count += int(mask.sum())
            if self.first_token_scoring:
                # Row i's first label token is predicted at its first target position.
                first = mask.float().argmax(-1)
                rows = logits[torch.arange(len(prompts), device=logits.device), first]
                candidates = torch.tensor([ids[0] for ids in self.label_ids], device=logits.device)
                predicted = rows[:, candidates].argmax(-1)
            else:
                predicted = self._score_every_label(model, prompts, device, autocast)
            correct += int((predicted.cpu() == torch.tensor(gold)).sum())
        count = len(self.eval_prompts)
        eval_loss = loss_sum / max(1, loss_count)
        return {
            "eval_loss": eval_loss,
            "eval_ppl": perplexity(eval_loss),
            "eval_accuracy": correct / count,
        }

    def _score_every_label(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        device: torch.device,
        autocast: AutocastFactory,
    ) -> torch.Tensor:
        """Argmax over labels of the summed log-probability of each label's tokens."""
        scores = []
        for label in range(len(self.label_names)):
            batch = to_device(self._batch(prompts, [label] * len(prompts)), device)
            with autocast():
                logits = self._tail_logits(model, batch).float()
            targets = batch["input_ids"][:, -self.max_label_len :]
            logprobs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            scores.append((logprobs * batch["target_mask"]).sum(-1))
        return torch.stack(scores, dim=-1).argmax(-1)


__all__ = [
    "ClassificationWorkload",
    "TextToLabelWorkload",
    "build_finetune_workload",
    "resolve_task_kind",
]
