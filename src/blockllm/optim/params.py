"""Turn what users pass as ``params`` into named param groups.

BlockLLM keys its selection, visit counts and checkpoints by parameter *name*, so every tensor must
arrive with one: ``model.named_parameters()`` or groups carrying ``"names"`` (or torch's own
``"param_names"``) beside ``"params"``.
"""

from __future__ import annotations

from typing import Any

import torch


def normalize_param_groups(params: Any) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Return groups, each with ``"params"`` (tensors) and ``"param_names"`` (str), and aliases.

    The aliases map a tensor's kept name to the other names it was given (tied weights).

    Accepts an iterable of ``(name, tensor)`` pairs, or an iterable of dicts whose ``"params"`` are
    tensors with a parallel ``"names"``/``"param_names"`` list, or are themselves ``(name, tensor)``
    pairs.

    Raises:
        TypeError: a tensor arrives without a name, or an element has the wrong type.
        ValueError: the parameter list is empty, or a name is used for two different tensors.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "BlockLLM needs parameter names: pass model.named_parameters() or param groups with a "
            f"'names' key, got a single {type(params).__name__}"
        )
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            "params must be an ordered collection (a set changes order between runs), got a set"
        )
    items = list(params)
    if not items:
        raise ValueError("BlockLLM got an empty parameter list (params=[])")
    raw_groups = items if isinstance(items[0], dict) else [{"params": items}]
    groups: list[dict[str, Any]] = []
    aliases: dict[str, list[str]] = {}
    for raw_group in raw_groups:
        group, group_aliases = normalize_group(raw_group)
        groups.append(group)
        aliases.update(group_aliases)
    seen: dict[str, torch.Tensor] = {}
    for group in groups:
        for name, tensor in zip(group["param_names"], group["params"]):
            other = seen.setdefault(name, tensor)
            if other is not tensor:
                raise ValueError(f"Invalid params: the name {name!r} is given to two different tensors")
    return groups, aliases


def normalize_group(group: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Normalise one param group; see :func:`normalize_param_groups`."""
    if not isinstance(group, dict):
        raise TypeError(f"param groups must be dicts, got {type(group).__name__}")
    if "params" not in group:
        raise ValueError("Invalid param group: it has no 'params' key")
    group = dict(group)
    raw = group["params"]
    if isinstance(raw, torch.Tensor):
        raw = [raw]
    elif isinstance(raw, (set, frozenset)):
        raise TypeError("a param group's 'params' must be an ordered collection, got a set")
    raw = list(raw)
    names = group.pop("names", None)
    torch_names = group.pop("param_names", None)
    if names is not None and torch_names is not None and list(names) != list(torch_names):
        raise ValueError("Invalid param group: 'names' and 'param_names' disagree")
    names = list(names if names is not None else torch_names) if (names or torch_names) else None

    tensors: list[torch.Tensor] = []
    found_names: list[str] = []
    for position, item in enumerate(raw):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            found_names.append(item[0])
            tensors.append(item[1])
        elif isinstance(item, torch.Tensor):
            tensors.append(item)
        else:
            raise TypeError(
                "BlockLLM params must be (name, tensor) pairs or tensors with a 'names' list, got "
                f"{type(item).__name__} at position {position}"
            )
    if found_names and len(found_names) != len(tensors):
        raise TypeError("BlockLLM needs a name for every parameter; some entries have none")
    if found_names:
        if names is not None and names != found_names:
            raise ValueError("Invalid param group: 'names' disagree with the (name, tensor) pairs")
        names = found_names
    if names is None:
        raise TypeError(
            "BlockLLM needs parameter names: pass model.named_parameters() or param groups with a "
            "'names' key, got unnamed tensors"
        )
    if len(names) != len(tensors):
        raise ValueError(
            f"Invalid param group: {len(names)} names for {len(tensors)} tensors"
        )
    for name, tensor in zip(names, tensors):
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {type(name).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(tensor).__name__}, not a Tensor")

    # Tied weights: the same tensor under two names is one block, counted once. The first name
    # is kept (the one named_parameters() would report).
    unique_tensors: list[torch.Tensor] = []
    unique_names: list[str] = []
    first_name: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, tensor in zip(names, tensors):
        if id(tensor) in first_name:
            aliases.setdefault(first_name[id(tensor)], []).append(name)
            continue
        first_name[id(tensor)] = name
        unique_tensors.append(tensor)
        unique_names.append(name)
    group["params"] = unique_tensors
    group["param_names"] = unique_names
    return group, aliases
