"""What a model is made of, read without allocating it: every parameter tensor and the dimensions.

``blockllm estimate`` needs the exact size of each parameter tensor (BlockLLM's budget, the
largest transient gradient, the peers' blocks and adapters) and the decoder's dimensions (the
activation formula). Both come from building the model on PyTorch's ``meta`` device: modules are
constructed, shapes are real, and no storage is allocated, so an 8B model is read in a few
seconds on any machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockllm.app.deps import HF_PIP_LINE, require_module

#: Decoders whose layers are the Llama block the activation formula counts (RMSNorm, rotary
#: attention without biases or q/k norms, SwiGLU MLP). Others are estimated with the same formula
#: and a note that says so.
LLAMA_LIKE = ("llama",)

# "model.layers.3.self_attn.q_proj.weight" -> 3 (Llama, Mistral, Qwen, Gemma ...).
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One parameter tensor (a tied tensor appears once, under its first name).

    Attributes:
        name: The name ``named_parameters()`` gives it.
        shape: Its shape.
        linear: It is the weight or bias of an ``nn.Linear`` (autocast keeps a bf16 copy of it;
            LoRA wraps the layer).
        embedding: It is the weight of an ``nn.Embedding``.
        layer: The decoder layer it belongs to, or None (embedding, final norm, head).
    """

    name: str
    shape: tuple[int, ...]
    linear: bool
    embedding: bool
    layer: int | None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ModelShape:
    """The parameter tensors and decoder dimensions of one model.

    Attributes:
        name: The preset name or the config path it was read from.
        model_type: The Hugging Face ``model_type`` (``"llama"`` for the presets).
        hidden: Hidden size.
        intermediate: MLP width.
        layers: Number of decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (fewer than ``heads`` under grouped-query attention).
        head_dim: Width of one head.
        vocab: Vocabulary size (rows of the embedding and of the output head).
        tied: The output head shares the embedding's weight.
        tensors: Every parameter tensor, in ``named_parameters()`` order.
    """

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    tensors: tuple[TensorInfo, ...]

    @property
    def num_parameters(self) -> int:
        return sum(tensor.numel for tensor in self.tensors)

    @property
    def llama_like(self) -> bool:
        return self.model_type in LLAMA_LIKE

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        """The tensors of decoder layer ``layer``."""
        return [tensor for tensor in self.tensors if tensor.layer == layer]


def load_model_shape(model: str, *, vocab_size: int | None = None) -> ModelShape:
    """The shape of a preset (``tiny`` ... ``llama-1b``) or of a Hugging Face ``config.json``.

    Args:
        model: A preset name, a ``config.json`` file, or a directory that holds one.
        vocab_size: Overrides the vocabulary (presets default to their pretraining vocabulary:
            8192 for ``tiny``, 32000 for the others).

    Returns:
        The model's tensors and dimensions; nothing is allocated.

    Raises:
        ValueError: ``model`` is neither a preset nor a readable config of a causal LM.
        ImportError: ``transformers`` is not installed.
    """
    from blockllm.app.models.presets import PRESETS, llama_config

    if model in PRESETS:
        from blockllm.app.training.run_config import defaults_for

        vocab = (
            vocab_size if vocab_size is not None else defaults_for("pretrain", model)["vocab_size"]
        )
        config = llama_config(model, vocab)
    else:
        config = _read_config(model, PRESETS, vocab_size)
    return shape_of_config(config, name=model)


def shape_of_config(config: Any, *, name: str) -> ModelShape:
    """Build the causal LM of a ``transformers`` config on the meta device and read its tensors.

    Raises:
        ValueError: transformers has no causal LM for this config.
    """
    transformers = require_module("transformers", HF_PIP_LINE, "Reading a model's shape")
    try:
        with torch.device("meta"):  # shapes only: no weight is allocated or initialised
            network = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Invalid model {name!r}: no causal LM for this config ({exc})") from exc
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    return ModelShape(
        name=name,
        model_type=str(config.model_type),
        hidden=hidden,
        intermediate=int(config.intermediate_size),
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        tensors=tuple(_tensors(network)),
    )


def _tensors(network: nn.Module) -> list[TensorInfo]:
    """Every parameter once, with the kinds of module that use it (a tied weight has two)."""
    found: dict[int, dict[str, Any]] = {}
    for module_name, module in network.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            entry = found.setdefault(id(param), {"name": name, "shape": tuple(param.shape),
                                                 "linear": False, "embedding": False})  # fmt: skip
            entry["linear"] |= isinstance(module, nn.Linear)
            entry["embedding"] |= isinstance(module, nn.Embedding)
    # named_parameters() order (what an optimizer sees), a tied tensor under its first name.
    order = [id(param) for param in network.parameters()]
    result = []
    for key in order:
        entry = found[key]
        match = _LAYER.search(entry["name"])
        result.append(TensorInfo(layer=int(match.group(1)) if match else None, **entry))
    return result


def _read_config(path_text: str, presets: Mapping[str, Any], vocab_size: int | None) -> Any:
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"Invalid model: {path_text!r} (choose a preset: {', '.join(map(repr, presets))}; or "
            "give the path of a Hugging Face config.json)"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"Invalid model config {str(path)!r}: {exc}") from exc
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f'Invalid model config {str(path)!r}: it names no "model_type"')
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    transformers = require_module("transformers", HF_PIP_LINE, "Reading a model config")
    values = dict(values)
    model_type = values.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Invalid model config {str(path)!r}: {exc}") from exc


__all__ = ["LLAMA_LIKE", "ModelShape", "TensorInfo", "load_model_shape", "shape_of_config"]
