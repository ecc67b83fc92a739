"""An FSDP2 BlockLLM's state in the form ``torch.distributed.checkpoint`` (DCP) saves and reshards.

``BlockLLM.state_dict()`` under FSDP2 is *per rank*: local moments, and coordinates local to the
rank's shard. DCP needs more: a key that several ranks save must hold the same value on all of
them (it keeps one copy), and anything per rank must be a DTensor so it can be resharded. So:

* the moments (and masters) of whole selected tensors become DTensors placed like their
  parameter, which DCP stores sharded and reshards on load like the model;
* everything else goes into one ``bytes`` entry that is identical on every rank: the
  ``"blockllm"`` section with *global* coordinates, torch's param groups, the step counters, the
  compact moments of partly selected tensors gathered in global coordinate order, and the
  factored rest rule's statistics with their per-row parts gathered in shard order. That is
  exactly what one process would save, and it is small: partly selected tensors hold at most
  the budget's remainder, the rule O(rows + columns) per tensor.

Loading is the reverse: each rank keeps the part of the global coordinates (and of the compact
moments) that falls into its own shard, so a checkpoint also loads on a different number of ranks.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from blockllm.distributed.fsdp2 import FSDP2Sync
from blockllm.errors import StateDictMismatchError
from blockllm.selection.coordinates import compact_index

if TYPE_CHECKING:
    from blockllm.optim.blockllm import BlockLLM

FORMAT_VERSION = 1
META_KEY = "blockllm_meta"
STATE_KEY = "state"


def sharded_state_dict(optimizer: BlockLLM) -> dict[str, Any]:
    """The optimizer's state as ``{META_KEY: bytes, STATE_KEY: {name: {key: DTensor}}}``.

    Collective: every rank of the mesh must call it (it gathers the partly selected tensors).
    """
    sync = _sync_of(optimizer)
    local = optimizer.state_dict()
    section = dict(local["blockllm"])
    candidates = _candidates_by_name(optimizer)
    pid_of = _param_ids(optimizer)
    partial_names = sorted(section["coordinates"])  # the same on every rank, so gathers match
    section["rest"] = _rest_state_whole(section.get("rest", {}), sync)

    coordinates: dict[str, torch.Tensor] = {}
    partial: dict[str, dict[str, torch.Tensor]] = {}
    for name in partial_names:
        param = candidates[name]
        start, _ = sync.shard_range(param)
        mine = section["coordinates"][name].long() + start
        coordinates[name] = compact_index(_gather_in_shard_order(mine, sync), param.numel())
        state = local["state"].get(pid_of[id(param)])
        if state is not None:
            partial[name] = {
                key: value if key == "step" else _gather_in_shard_order(value, sync)
                for key, value in sorted(state.items())
            }

    whole: dict[str, dict[str, Any]] = {}
    sharded: dict[str, dict[str, DTensor]] = {}
    for name in section["selected"]:
        param = candidates[name]
        state = local["state"].get(pid_of[id(param)])
        if name in coordinates or state is None:
            continue
        tensors = {key: value for key, value in state.items() if key != "step"}
        whole[name] = {
            "step": state["step"],
            "dtypes": {
                key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()
            },
        }
        sharded[name] = {
            key: DTensor.from_local(
                value,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
            for key, value in tensors.items()
        }

    section["coordinates"] = coordinates
    meta = {
        "format_version": FORMAT_VERSION,
        "param_groups": local["param_groups"],
        "blockllm": section,
        "whole": whole,
        "partial": partial,
    }
    buffer = io.BytesIO()
    torch.save(meta, buffer)
    return {META_KEY: buffer.getvalue(), STATE_KEY: sharded}


def read_meta(blob: bytes) -> dict[str, Any]:
    """Decode the ``META_KEY`` entry of :func:`sharded_state_dict`."""
    meta = torch.load(io.BytesIO(blob), weights_only=True)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise StateDictMismatchError(
            f"Invalid checkpoint: BlockLLM FSDP state format_version {version!r}; this blockllm "
            f"reads format_version {FORMAT_VERSION}"
        )
    return meta


def state_skeleton(optimizer: BlockLLM, meta: dict[str, Any]) -> dict[str, dict[str, DTensor]]:
    """Empty DTensors, placed like their parameters, for DCP to load the sharded moments into."""
    candidates = _candidates_by_name(optimizer)
    skeleton: dict[str, dict[str, DTensor]] = {}
    for name, entry in meta["whole"].items():
        if name not in candidates:
            raise StateDictMismatchError(
                f"Invalid checkpoint: it holds state for {name!r}, which is no candidate here"
            )
        param = candidates[name]
        skeleton[name] = {
            key: torch.empty_like(param, dtype=getattr(torch, dtype), requires_grad=False)
            for key, dtype in entry["dtypes"].items()
        }
    return skeleton


def load_sharded_state_dict(
    optimizer: BlockLLM, meta: dict[str, Any], state: dict[str, dict[str, DTensor]]
) -> None:
    """Restore the optimizer from :func:`read_meta`'s result and the loaded :func:`state_skeleton`.

    Not collective: each rank keeps what falls into its own shard.
    """
    sync = _sync_of(optimizer)
    candidates = _candidates_by_name(optimizer)
    pid_of = _param_ids(optimizer)
    section = dict(meta["blockllm"])
    local_state: dict[int, dict[str, torch.Tensor]] = {}
    local_coordinates: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name, full in section["coordinates"].items():
        param = candidates[name]
        start, stop = sync.shard_range(param)
        full = full.long()
        inside = (full >= start) & (full < stop)
        local_coordinates[name] = compact_index(full[inside] - start, stop - start)
        counts[name] = full.numel()
        saved = meta["partial"].get(name)
        if saved is not None:
            local_state[pid_of[id(param)]] = {
                key: value.clone() if key == "step" else value[inside].clone()
                for key, value in saved.items()
            }
    for name, entry in meta["whole"].items():
        restored = {key: value.to_local().clone() for key, value in state[name].items()}
        restored["step"] = entry["step"].clone()
        local_state[pid_of[id(candidates[name])]] = restored
    section["coordinates"] = local_coordinates
    section["rest"] = _rest_state_of_shard(section.get("rest", {}), candidates, sync)
    optimizer.load_state_dict(
        {"state": local_state, "param_groups": meta["param_groups"], "blockllm": section}
    )
    # num_selected counts every rank's coordinates; the local lists alone cannot tell.
    for name, count in counts.items():
        sync.remember_count(optimizer.coordinates(name), count)


# The keys of a rest rule's state that hold one value per row of the tensor (a matrix's row
# statistics; a vector's per-entry ones): each rank holds its rows' part. Every other key
# (column statistics, step counters) is the same on every rank.
_PER_ROW_KEYS = ("row", "full")


def _rest_state_whole(rest: dict[str, Any], sync: FSDP2Sync) -> dict[str, Any]:
    """The rest section with the rule's per-row statistics gathered from every rank, in shard
    order: what one process would hold. Collective (the tensors' names are the same on every
    rank: each rank steps the same tensors)."""
    rule = rest.get("rule")
    if not rule:
        return rest
    whole = {
        name: {
            key: _gather_in_shard_order(value, sync) if key in _PER_ROW_KEYS else value
            for key, value in sorted(rule[name].items())
        }
        for name in sorted(rule)
    }
    return {**rest, "rule": whole}


def _rest_state_of_shard(
    rest: dict[str, Any], candidates: dict[str, torch.Tensor], sync: FSDP2Sync
) -> dict[str, Any]:
    """The rest section with the rule's per-row statistics cut to this rank's rows."""
    rule = rest.get("rule")
    if not rule:
        return rest
    mine = {}
    for name, state in rule.items():
        if name not in candidates:
            raise StateDictMismatchError(
                f"Invalid checkpoint: it holds rest-rule state for {name!r}, which is no "
                "candidate here"
            )
        param = candidates[name]
        start, stop = sync.shard_range(param)
        width = param.shape[-1] if param.dim() >= 2 else 1
        mine[name] = {
            key: value[start // width : stop // width].clone() if key in _PER_ROW_KEYS else value
            for key, value in state.items()
        }
    return {**rest, "rule": mine}


def _sync_of(optimizer: BlockLLM) -> FSDP2Sync:
    sync = optimizer.communicator
    if not isinstance(sync, FSDP2Sync):
        raise TypeError(
            "Invalid optimizer: its parameters are not FSDP2 DTensors; use "
            "optimizer.state_dict() with torch.save for a single process or process_group="
        )
    return sync


def _candidates_by_name(optimizer: BlockLLM) -> dict[str, torch.Tensor]:
    return dict(optimizer.named_candidates())


def _param_ids(optimizer: BlockLLM) -> dict[int, int]:
    """id(parameter) -> its key in torch's optimizer state_dict (position over all groups)."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {id(param): position for position, param in enumerate(params)}


def _gather_in_shard_order(piece: torch.Tensor, sync: FSDP2Sync) -> torch.Tensor:
    """The concatenation of every rank's 1-D ``piece``, in the order of their shards.

    Pieces differ in length (a rank holds the coordinates inside its shard), and collectives
    want equal shapes: gather the lengths, pad to the longest, gather, trim.
    """
    piece = piece.reshape(-1)
    world = sync.world_size
    header = torch.tensor([sync.coordinate, piece.numel()], dtype=torch.int64, device=piece.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=sync.group)
    longest = max(int(h[1]) for h in headers)
    padded = piece.new_zeros(longest)
    padded[: piece.numel()] = piece
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=sync.group)
    ordered = sorted(zip(headers, pieces), key=lambda pair: int(pair[0][0]))
    return torch.cat([p[: int(h[1])] for h, p in ordered])
