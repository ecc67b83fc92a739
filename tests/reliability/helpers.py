"""Shared pieces of the reliability suite: tiny models, memory probes, the CLI in a subprocess.

``COUNTS`` collects what the suite exercised (steps soaked, kills survived, bad inputs tried, anything
lost); ``conftest.py`` prints it at the end of the session.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

COUNTS: Counter[str] = Counter()

from tests.app.tiny import EXACT_KEYS  # noqa: E402,F401  (re-exported for the suite)


def exact(records: list[dict]) -> list[dict]:
    return [{key: record[key] for key in EXACT_KEYS if key in record} for record in records]


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2) -> nn.Module:
    """A 22k-parameter Llama with 21 tensors of very different sizes (~5 ms a step on one core)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def token_batches(count: int, vocab: int = 64, batch: int = 4, seq: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(count)]


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def current_rss_bytes() -> int | None:
    """Resident set size now (not the peak), or None where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def hook_count(params) -> int:
    """Post-accumulate-grad hooks registered on ``params`` (each tensor counted once)."""
    seen, total = set(), 0
    for param in params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += len(param._post_accumulate_grad_hooks or {})
    return total


def live_owner_entries() -> int:
    """Entries in BlockLLM's hook-owner registry (must not grow with reselections).

    A private registry: looked up where each version of the optimizer keeps it.
    """
    for module_name, attribute in (
        ("blockllm.optim.grad_hooks", "_OWNERS"),
        ("blockllm.optim.blockllm", "_HOOK_OWNERS"),
    ):
        try:
            registry = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError:
            continue
        if registry is not None:
            return len(registry)
    return 0


def python_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters(remove_duplicate=False)
    }


def state_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of the optimizer's per-parameter state and selection section."""
    snapshot = {"state": {id(p): copy.deepcopy(dict(s)) for p, s in optimizer.state.items()}}
    section = optimizer.state_dict().get("blockllm")
    if section is not None:
        section = dict(section)
        section.pop("selection_seconds", None)  # wall time, not state
        snapshot["blockllm"] = copy.deepcopy(section)
    return snapshot


def same(a, b) -> bool:
    """Exact structural equality of nested dicts/lists/tensors (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(
                torch.nan_to_num(a.float(), nan=1.5e38), torch.nan_to_num(b.float(), nan=1.5e38)
            )
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """One hash of a state dict's tensors, to compare model states step by step cheaply."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(
            tensors[name]
            .detach()
            .cpu()
            .reshape(-1)
            .contiguous()
            .view(torch.uint8)
            .numpy()
            .tobytes()
        )
    return hasher.hexdigest()


def read_lines(run_dir: Path) -> list[dict]:
    """Complete lines of ``metrics.jsonl`` (a line cut by SIGKILL is not a record)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blockllm", "--log-level", "warning", *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
