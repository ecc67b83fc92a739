"""The ``"blockllm"`` section of ``BlockLLM.state_dict()``: its version and its checks on load."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from blockllm.errors import StateDictMismatchError
from blockllm.optim.adam_update import needs_master

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
    # Older checkpoints have no shapes; their state tensors are checked by check_state below.
    for name, shape, param in zip(saved, section.get("shapes", ()), params):
        if tuple(shape) != tuple(param.shape):
            raise StateDictMismatchError(
                f"Invalid state_dict: it is from a different model ({name!r} has shape "
                f"{tuple(shape)} there, {tuple(param.shape)} here)"
            )
    if section["budget"] != budget:
        raise StateDictMismatchError(
            f"Invalid state_dict: it was saved with budget {section['budget']} "
            f"(sparsity {section['sparsity']}), this optimizer has {budget} "
            f"(sparsity {sparsity})"
        )


def check_state(
    saved_state: dict[Any, dict[str, Any]],
    every_param: list[torch.Tensor],
    names: dict[int, str],
    section: dict[str, Any],
    local: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
    master_weights: bool = True,
) -> None:
    """Raise ``StateDictMismatchError`` for Adam state that does not fit its parameter.

    A whole selected tensor's moments (and master copy) must have its shape; a partly selected
    one's must hold one entry per saved coordinate, and the coordinates must lie inside it. A
    bf16/fp16 parameter needs the fp32 master copy its update runs on, unless the optimizer
    steps bf16 without masters (``master_weights=False``).

    Args:
        saved_state: torch's ``"state"`` (position over all param groups -> entries).
        every_param: the parameters of all param groups, in order.
        names: ``id(param)`` -> candidate name, for the candidates.
        section: the ``"blockllm"`` section (its ``"coordinates"``).
        local: this rank's shard of a parameter (FSDP2 state is per shard).
    """
    for key, entries in saved_state.items():
        position = int(key)
        if position >= len(every_param):
            raise StateDictMismatchError(
                f"Invalid state_dict: it holds state for parameter {position}, this optimizer "
                f"has {len(every_param)} parameters"
            )
        name = names.get(id(every_param[position]), f"parameter {position}")
        param = local(every_param[position])
        coordinates = section["coordinates"].get(name)
        if coordinates is not None and coordinates.numel():
            if int(coordinates.max()) >= param.numel():
                raise StateDictMismatchError(
                    f"Invalid state_dict: its coordinates of {name!r} reach "
                    f"{int(coordinates.max())}, beyond its {param.numel()} elements here"
                )
        expected = (coordinates.numel(),) if coordinates is not None else tuple(param.shape)
        for key_name, value in entries.items():
            if key_name == "step" or not isinstance(value, torch.Tensor):
                continue
            if tuple(value.shape) != expected:
                raise StateDictMismatchError(
                    f"Invalid state_dict: its {key_name} of {name!r} has shape "
                    f"{tuple(value.shape)}, {expected} expected here"
                )
        if needs_master(param, master_weights) and "master" not in entries:
            raise StateDictMismatchError(
                f"Invalid state_dict: {name!r} is {param.dtype} here, but its state has no fp32 "
                "master copy (it was saved for a full-precision parameter, or with "
                "master_weights=False: resume with master_weights=False)"
            )


def model_section(
    names: list[str], params: list[torch.Tensor], budget: int, sparsity: float
) -> dict[str, Any]:
    """The entries of the section that describe the model and the budget (checked on load)."""
    return {
        "format_version": STATE_FORMAT_VERSION,
        "candidates": list(names),
        "numels": [param.numel() for param in params],
        "shapes": [list(param.shape) for param in params],
        "sparsity": sparsity,
        "budget": budget,
    }


def restored_state(
    saved_state: dict[Any, dict[str, Any]], every_param: list[torch.Tensor]
) -> defaultdict[torch.Tensor, dict[str, Any]]:
    """torch's ``state`` rebuilt from a saved one with exact copies (no dtype casts)."""
    state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
    for key, saved in saved_state.items():
        param = every_param[int(key)]
        state[param] = {name: restore_tensor(name, value, param) for name, value in saved.items()}
    return state


def parked_section(
    parked: dict[int, dict[str, torch.Tensor]], names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """``keep_moments``' moments of the blocks away from the selection, keyed by name."""
    return {names[index]: dict(entry) for index, entry in sorted(parked.items())}


def restored_parked(
    saved: dict[str, dict[str, Any]],
    names: list[str],
    params: list[torch.Tensor],
    local: Callable[[torch.Tensor], torch.Tensor],
) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`parked_section` read back onto the candidates, each moment checked against its shape.

    Raises:
        StateDictMismatchError: a name that is no candidate, or moments of another shape.
    """
    index_of = {name: index for index, name in enumerate(names)}
    parked: dict[int, dict[str, torch.Tensor]] = {}
    for name, entry in saved.items():
        if name not in index_of:
            raise StateDictMismatchError(
                f"Invalid state_dict: it keeps moments for {name!r}, which is no candidate here"
            )
        param = params[index_of[name]]
        expected = tuple(local(param).shape)
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(entry[key].shape) != expected:
                raise StateDictMismatchError(
                    f"Invalid state_dict: its kept {key} of {name!r} has shape "
                    f"{tuple(entry[key].shape)}, {expected} expected here"
                )
        parked[index_of[name]] = {key: restore_tensor(key, value, param) for key, value in entry.items()}
    return parked


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


__all__ = [
    "STATE_FORMAT_VERSION",
    "check_same_model",
    "check_state",
    "model_section",
    "read_section",
    "restored_state",
    "restore_tensor",
]
