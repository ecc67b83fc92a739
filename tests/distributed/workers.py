"""Worker functions run in spawned processes (they must be importable by module path)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist

from blockllm import BlockLLM
from tests.distributed.group import leave_together
from tests.optim.helpers import TinyNet, loss_of, make_batches

STEPS = 14
OPTIMIZER_KWARGS = dict(lr=1e-2, weight_decay=0.01, sparsity=0.85, trigger="interval", patience=3)


def _train(model, opt, halves, rank, world_size):
    history = []
    for tokens, labels in halves:
        rows = slice(rank * len(tokens) // world_size, (rank + 1) * len(tokens) // world_size)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, (tokens[rows], labels[rows]))
        loss.backward()
        opt.step(loss=loss)
        history.append(list(opt.selected))
    return history


def data_parallel_worker(
    rank: int, world_size: int, store: str, out_dir: str, options: dict | None = None
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(100 + rank)  # different initial weights: the optimizer broadcasts
        model = TinyNet(width=24)
        opt = BlockLLM(
            model.named_parameters(), process_group=dist.group.WORLD,
            **OPTIMIZER_KWARGS, **(options or {}),
        )  # fmt: skip
        history = _train(model, opt, make_batches(STEPS, batch=16), rank, world_size)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "history": history,
                "reselections": opt.num_reselections,
                "bytes": opt.communicator.bytes_communicated,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        leave_together()
    finally:
        dist.destroy_process_group()


def clip_norm_worker(rank: int, world_size: int, store: str, out_dir: str, rest: str) -> None:
    """Each step, the norm BlockLLM clips against on two ranks (half the batch each) beside the
    norm of the whole batch's gradient, computed on this rank by a twin with the same weights.
    The twin is reloaded every step, so no drift between two trajectories enters: what is left
    is the accounting of the rest's consumed norms, the held gradients and the averaging."""
    from tests.optim.test_llama import patterned_batches, tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    try:
        model, twin = tiny_llama(), tiny_llama()
        opt = BlockLLM(
            model.named_parameters(), lr=3e-3, sparsity=0.9, rest=rest, trigger="interval",
            patience=2, process_group=dist.group.WORLD,
        )  # fmt: skip
        ratios = []
        for tokens in patterned_batches(10):
            twin.load_state_dict(model.state_dict())
            twin.zero_grad(set_to_none=True)
            twin(input_ids=tokens, labels=tokens).loss.backward()
            whole = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
            half = tokens.chunk(world_size)[rank]
            loss = model(input_ids=half, labels=half).loss
            loss.backward()
            ratios.append(float(opt.clip_grad_norm_(1.0)) / float(whole))
            opt.step(loss=loss)
            opt.zero_grad(set_to_none=True)
        torch.save({"ratios": ratios, "reselections": opt.num_reselections}, Path(out_dir) / f"rank{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def single_process_reference(options: dict | None = None) -> dict:
    """The same training on one process with the whole (concatenated) batch."""
    torch.manual_seed(100)  # rank 0's initial weights, which the broadcast hands everyone
    model = TinyNet(width=24)
    opt = BlockLLM(model.named_parameters(), **OPTIMIZER_KWARGS, **(options or {}))
    history = _train(model, opt, make_batches(STEPS, batch=16), 0, 1)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "history": history,
        "reselections": opt.num_reselections,
    }


def ddp_detection_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    outcome = {}
    try:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(TinyNet(width=8))
        try:
            BlockLLM(wrapped.named_parameters(), sparsity=0.5)
            outcome["plain"] = "accepted"
        except ValueError as err:
            outcome["plain"] = str(err)
        # With a process group BlockLLM averages every selected gradient itself: accepted.
        BlockLLM(TinyNet(width=8).named_parameters(), sparsity=0.5, process_group=dist.group.WORLD)
        outcome["with_group"] = "accepted"
        torch.save(outcome, Path(out_dir) / f"ddp{rank}.pt")
        # DDP's reducer holds the group: release it while the group is alive (a reducer torn
        # down after destroy_process_group aborted a rank in CI, SIGABRT).
        del wrapped
        gc.collect()
        leave_together()
    finally:
        dist.destroy_process_group()
