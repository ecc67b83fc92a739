"""Llama-style models built from a config: random init, no download.

The sizes are the ones GaLore, BAdam and the BlockLLM paper pretrain on C4 (60M to 1B), plus a
~7M ``tiny`` for the CPU quick start. Parameter counts in the names assume a 32k vocabulary;
here the vocabulary comes from the tokenizer, so e.g. ``tiny`` with an 8192-token BPE has 7.4M.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from blockllm.app.checks import check_int
from blockllm.app.deps import HF_PIP_LINE, require_module

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

logger = logging.getLogger(__name__)


def _shape(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        # Multi-head attention as in GaLore's configs (no grouped-query sharing).
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }


#: Architecture of each preset (``LlamaConfig`` keyword arguments, vocabulary excluded).
#: ``tiny`` and ``llama-20m`` share a shape: ``tiny`` names the quick-start setting (8k vocabulary,
#: ~7M parameters), ``llama-20m`` the same network at a 32k vocabulary (~20M).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _shape(256, 688, 4, 4),
    "llama-20m": _shape(256, 688, 4, 4),
    "llama-60m": _shape(512, 1376, 8, 8),
    "llama-130m": _shape(768, 2048, 12, 12),
    "llama-350m": _shape(1024, 2736, 24, 16),
    "llama-1b": _shape(2048, 5461, 24, 32),
}


def build_llama(
    preset: str,
    vocab_size: int,
    max_seq_len: int = 256,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Build a randomly initialised ``LlamaForCausalLM`` of a preset size.

    The output head is untied from the input embedding (as in GaLore and the paper), so BlockLLM
    can select the two independently. Initialisation draws from a private RNG seeded with
    ``seed``: the same arguments give bitwise the same weights, and the caller's global torch RNG
    state is left as it was.

    The config carries no BOS/EOS/pad ids, since they belong to the tokenizer; set
    ``model.config.eos_token_id`` etc. from it before calling ``generate``.

    Args:
        preset: One of :data:`PRESETS`.
        vocab_size: Vocabulary size of the tokenizer.
        max_seq_len: Longest sequence the rotary embedding is set up for.
        seed: Seed of the initialisation.
        dtype: Floating-point dtype of the parameters.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: Unknown preset, or a count below 1.
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``, or a count is not an int.
        ImportError: ``transformers`` is not installed.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(
            f"Invalid preset: {preset!r} (choose from {', '.join(map(repr, PRESETS))})"
        )
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    max_seq_len = check_int("max_seq_len", max_seq_len, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"Invalid dtype: {dtype!r} (expected a floating-point torch.dtype such as torch.bfloat16)"
        )
    transformers = require_module("transformers", HF_PIP_LINE, "Building a Llama model")
    config = llama_config(preset, vocab_size, max_seq_len)
    # fork_rng restores the global RNG afterwards, so building a model does not shift the
    # randomness of whatever the caller does next (data order, dropout).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config creates the weights directly in ``dtype``: no float32 copy of a 1B model
        # is ever held just to be cast down.
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    logger.info(
        "Built %s: %.2fM parameters, vocab %d, %s, attention %s",
        preset,
        count_parameters(model) / 1e6,
        vocab_size,
        dtype,
        config._attn_implementation,
    )
    return model


def llama_config(preset: str, vocab_size: int, max_seq_len: int = 256) -> Any:
    """The ``LlamaConfig`` of a preset (what :func:`build_llama` builds; ``blockllm estimate`` too).

    Raises:
        ValueError: Unknown preset.
        ImportError: ``transformers`` is not installed.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(
            f"Invalid preset: {preset!r} (choose from {', '.join(map(repr, PRESETS))})"
        )
    transformers = require_module("transformers", HF_PIP_LINE, "Building a Llama model")
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        # SDPA picks a fused kernel where one exists and is exact otherwise.
        attn_implementation="sdpa",
        **PRESETS[preset],
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements in ``model``, each shared (tied) tensor counted once."""
    # Module.parameters() already yields a shared tensor only once.
    return sum(p.numel() for p in model.parameters())
