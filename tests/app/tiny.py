"""Small, fast settings shared by the train and CLI tests (a few ms per step on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

from blockllm.app.training import RunConfig

# The tiny preset at vocab 512 (3.4M parameters), 4 x 32 tokens per step, on 200k characters of
# the standard library: the tokenizer trains in about a second and is cached for the session.
TINY = dict(vocab_size=512, seq_len=32, batch_size=4, max_chars=200_000, eval_batches=2)

TINY_FLAGS = [
    "--model", "tiny", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4",
    "--max-chars", "200000", "--eval-batches", "2", "--progress", "off",
]  # fmt: skip


def tiny_config(**overrides) -> RunConfig:
    values = {**TINY, "max_steps": 6, "eval_every": 3, "save_every": 3, "patience": 2, **overrides}
    return RunConfig.create("pretrain", "tiny", **values)


def cache_path(tmp_path_factory) -> Path:
    """One tokenizer/model cache for the whole session (train and CLI tests share it)."""
    path = tmp_path_factory.getbasetemp() / "blockllm-cache"
    path.mkdir(exist_ok=True)
    return path


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, to prove nothing changed."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# Metrics that an interrupted-and-resumed run must reproduce exactly (timings never are).
EXACT_KEYS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "eval_loss",
    "tokens",
    "num_reselections",
    "num_selected",
    "num_skipped_steps",
)
