"""The ``"blockllm"`` section of ``BlockLLM.state_dict()``: its version and its checks on load."""

from __future__ import annotations

import copy
from typing import Any

import torch

from blockllm.errors import StateDictMismatchError

STATE_FORMAT_VERSION = 1


def read_section(state_dict: Any) -> dict[str, Any]:
    """The ``"blockllm"`` section of a state dict, or a clear error for anything else.

    Raises:
        StateDictMismatchError: the state_dict was not saved by BlockLLM, or by an unknown
            format version.
    """
    section = state_dict.get("blockllm") if isinstance(state_dict, dict) else None
    if section is None:
        raise StateDictMismatchError(
            "Invalid state_dict: it has no 'blockllm' section, so it was not saved by BlockLLM"
        )
    version = section.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise StateDictMismatchError(
            f"Invalid state_dict: format_version {version!r} cannot be read by this blockllm "
            f"(it reads format_version {STATE_FORMAT_VERSION})"
        )
    return section


def check_same_model(
    section: dict[str, Any],
    names: list[str],
    params: list[torch.Tensor],
    budget: int,
    sparsity: float,
) -> None:
    """Raise ``StateDictMismatchError`` unless ``section`` was saved for these candidates."""
    saved = list(section["candidates"])
    if saved != names:
        missing = [n for n in names if n not in set(saved)]
        unexpected = [n for n in saved if n not in set(names)]
        detail = f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        if not missing and not unexpected:
            detail = "same names in a different order"
        raise StateDictMismatchError(f"Invalid state_dict: it is from a different model ({detail})")
    for name, saved_numel, param in zip(saved, section["numels"], params):
        if int(saved_numel) != param.numel():
            raise StateDictMismatchError(
                f"Invalid state_dict: it is from a different model ({name!r} has "
                f"{saved_numel} elements there, {param.numel()} here)"
            )
    if section["budget"] != budget:
        raise StateDictMismatchError(
            f"Invalid state_dict: it was saved with budget {section['budget']} "
            f"(sparsity {section['sparsity']}), this optimizer has {budget} "
            f"(sparsity {sparsity})"
        )


def restore_tensor(key: str, value: Any, param: torch.Tensor) -> Any:
    """An exact copy of a saved state entry, on ``param``'s device (``step`` stays put).

    torch's own loader casts floating state to the parameter's dtype, which would turn the fp32
    moments and master copies of bf16 blocks into bf16.
    """
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if key == "step":
        return value.clone()
    return value.to(device=param.device).clone()


__all__ = ["STATE_FORMAT_VERSION", "check_same_model", "read_section", "restore_tensor"]
