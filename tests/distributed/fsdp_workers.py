"""FSDP2 workers run in spawned processes, and the one-process reference they are compared with."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from blockllm import BlockLLM
from tests.distributed.group import leave_together

STEPS = 10
VOCAB = 61  # odd: the embedding and the head split 31/30 rows over two ranks
# The defaults otherwise: rest="auto" (the factored rule, its column statistics summed over
# the ranks), so the one-process reference steps alike.
OPTIMIZER_KWARGS = dict(lr=1e-2, weight_decay=0.01, sparsity=0.9, trigger="loss", patience=2)


def make_model(dtype: torch.dtype = torch.float32):
    """A tiny Llama, the same on every process (FSDP2 shards it, it does not broadcast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def batches(vocabulary: int = VOCAB) -> list[torch.Tensor]:
    # Random tokens: the loss cannot fall for long, so the plateau trigger reselects often.
    # A small ``vocabulary`` leaves most embedding rows at zero gradient: ties everywhere.
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocabulary, (4, 12), generator=generator) for _ in range(STEPS)]


def partial_record(opt: BlockLLM, shard_start) -> dict:
    """The partly selected tensors: name -> flat coordinates in the full tensor (this rank's)."""
    record = {}
    for name in opt.selected:
        coordinates = opt.coordinates(name)
        if coordinates is not None:
            # As a set: one process stores rows first, a shard its coordinates in order.
            record[name] = coordinates.long().sort().values + shard_start(name)
    return record


def train(model, opt, start, stop, rank, world_size, on_step=None, vocabulary=VOCAB) -> list[dict]:
    history = []
    data = batches(vocabulary)
    for step in range(start, stop):
        rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
        opt.zero_grad(set_to_none=True)
        tokens = data[step][rows]
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step(loss=loss)
        history.append({"selected": list(opt.selected), "num_selected": opt.num_selected})
        if on_step is not None:
            on_step(step, history[-1])
    return history


def single_process_reference(
    options: dict | None = None, vocabulary: int = VOCAB, dtype: torch.dtype = torch.float32
) -> dict:
    """The same training on one process with the whole batch."""
    model = make_model(dtype)
    opt = BlockLLM(model.named_parameters(), **{**OPTIMIZER_KWARGS, **(options or {})})

    def on_step(step, entry):
        entry["partial"] = partial_record(opt, lambda name: 0)

    history = train(model, opt, 0, STEPS, 0, 1, on_step, vocabulary)
    rule = opt.state_dict()["blockllm"]["rest"].get("rule", {})
    return {
        # The rest rule's state that every rank holds whole: column statistics, step counters.
        "rule_replicated_bytes": sum(
            value.numel() * value.element_size()
            for state in rule.values() for key, value in state.items() if key not in ("row", "full")
        ),  # fmt: skip
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "history": history,
        "memory": opt.memory_report(),
        "num_states": len(opt.state),
        "reselections": opt.num_reselections,
    }


def _setup(
    rank: int,
    world_size: int,
    store: str,
    options: dict | None = None,
    dtype: torch.dtype = torch.float32,
):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    model = make_model(dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = BlockLLM(model.named_parameters(), **{**OPTIMIZER_KWARGS, **(options or {})})
    return mesh, model, opt


def _shard_start(opt: BlockLLM):
    params = dict(opt.named_candidates())
    return lambda name: opt.communicator.shard_range(params[name])[0]


def _full_params(model) -> dict[str, torch.Tensor]:
    # full_tensor() all-gathers: every rank walks the parameters in the same order.
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _local_bytes(tensors) -> int:
    return sum(t.to_local().numel() * t.to_local().element_size() for t in tensors if t is not None)


def fsdp_train_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    """Train STEPS steps under FSDP2, writing a DCP checkpoint after each step.

    Which checkpoint the resume test uses depends on where the selections fall (the test picks
    one whose partly selected tensor keeps its moments into the next step), so all are kept.
    """
    from blockllm.distributed.fsdp2_checkpoint import save_checkpoint

    mesh, model, opt = _setup(rank, world_size, store)
    try:
        shard_start = _shard_start(opt)
        by_name = dict(opt.named_candidates())

        def on_step(step, entry):
            entry["partial"] = partial_record(opt, shard_start)
            entry["local_partial"] = {n: c.numel() for n, c in entry["partial"].items()}
            entry["partial_with_state"] = [n for n in entry["partial"] if opt.state.get(by_name[n])]
            if step + 1 < STEPS and entry["partial_with_state"]:  # only those the test may use
                save_checkpoint(Path(out_dir) / f"checkpoint-{step + 1}", model, opt)

        history = train(model, opt, 0, STEPS, rank, world_size, on_step)
        params = list(model.parameters())
        outcome = {
            "history": history,
            "memory": opt.memory_report(),
            "local_param_bytes": _local_bytes(params),
            # .grad shards, plus the selected coordinates' gradients kept compacted outside them.
            "local_grad_bytes": _local_bytes([p.grad for p in params])
            + opt.compact_gradients.nbytes,
            "num_states": len(opt.state),
            "reselections": opt.num_reselections,
            "errors": _argument_errors(mesh),
        }
        outcome["params"] = _full_params(model)
        torch.save(outcome, Path(out_dir) / f"train{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def fsdp_options_worker(
    rank: int,
    world_size: int,
    store: str,
    out_dir: str,
    options: dict | None = None,
    vocabulary: int = VOCAB,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Train STEPS steps under FSDP2 with extra optimizer options; save the full parameters."""
    mesh, model, opt = _setup(rank, world_size, store, options, dtype)
    try:
        shard_start = _shard_start(opt)

        def on_step(step, entry):
            entry["partial"] = partial_record(opt, shard_start)

        history = train(model, opt, 0, STEPS, rank, world_size, on_step, vocabulary)
        outcome = {
            "history": history, "reselections": opt.num_reselections,
            "memory": opt.memory_report(),
        }  # fmt: skip
        outcome["params"] = _full_params(model)
        torch.save(outcome, Path(out_dir) / f"options{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def fsdp_resume_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    """Fresh processes (as many as asked, not necessarily as saved): load, train the rest.

    The checkpoint is the one after the number of steps the test wrote into ``resume_at``.
    """
    from blockllm.distributed.fsdp2_checkpoint import load_checkpoint

    resume_at = int((Path(out_dir) / "resume_at").read_text())
    _, model, opt = _setup(rank, world_size, store)
    try:
        load_checkpoint(Path(out_dir) / f"checkpoint-{resume_at}", model, opt)
        loaded = {"num_selected": opt.num_selected, "selected": list(opt.selected)}
        history = train(model, opt, resume_at, STEPS, rank, world_size)
        outcome = {"history": history, "loaded": loaded, "params": _full_params(model)}
        torch.save(outcome, Path(out_dir) / f"resume{world_size}-{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def _argument_errors(mesh) -> dict[str, str]:
    """What BlockLLM says about layouts it does not support."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    errors = {}
    sharded = fully_shard(nn.Linear(4, 4), mesh=mesh)
    try:
        BlockLLM(sharded.named_parameters(), sparsity=0.5, process_group=dist.group.WORLD)
    except ValueError as err:
        errors["process_group"] = str(err)
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fully_shard(mixed[0], mesh=mesh)
    try:
        BlockLLM(mixed.named_parameters(), sparsity=0.5)
    except ValueError as err:
        errors["mixed"] = str(err)
    return errors


def packer_cases() -> list[dict]:
    """Gradients and plans for the sharded packer, as one process sees them."""
    from blockllm.selection.packing import PaperMaskPacker, WholeTensorPacker

    generator = torch.Generator().manual_seed(5)
    shapes = [(7, 3), (10, 5), (9, 4)]  # odd row counts: uneven shards
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    # Many equal magnitudes: the threshold falls inside a tie, which must be split exactly.
    tied = torch.randint(0, 3, (10, 5), generator=generator).float() - 1.0
    sizes = [g.numel() for g in grads]
    rows = [shape[1] for shape in shapes]
    scores = {0: 3.0, 1: 2.0, 2: 1.0}
    whole = WholeTensorPacker
    return [
        # largest-|G| coordinates; then capped tensors, one more partial behind them
        {"packer": whole(sizes, 21 + 17), "grads": grads, "scores": scores},
        {"packer": whole(sizes, 60, caps=[25] * 3), "grads": grads, "scores": scores},
        {"packer": whole(sizes, 21 + 23), "grads": [grads[0], tied, grads[2]], "scores": scores},
        # whole rows by row norm, with a few leftover coordinates, capped and not
        {"packer": whole(sizes, 21 + 17, row_sizes=rows), "grads": grads, "scores": scores},
        {"packer": whole(sizes, 60, caps=[22] * 3, row_sizes=rows), "grads": grads,
         "scores": scores},
        # the paper's joint threshold
        {"packer": PaperMaskPacker(sizes, 40), "grads": grads, "scores": scores},
        {"packer": PaperMaskPacker(sizes, 90), "grads": [grads[0], tied, grads[2]],
         "scores": scores},
    ]  # fmt: skip


class _Recorder:
    def __init__(self, group) -> None:
        self.group = group
        self.device = torch.device("cpu")  # where the collectives' scalars live (gloo)
        self.counts: list[int] = []

    def remember_count(self, coordinates, count) -> None:
        self.counts.append(count)


def sharded_packer_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    """Each rank holds dim-0 chunks of the gradients, as FSDP2 does; record global coordinates."""
    from blockllm.distributed.fsdp2_top import ShardedPacker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = []
        for case in packer_cases():
            local, starts = {}, {}
            for index, grad in enumerate(case["grads"]):
                rows = -(-grad.shape[0] // world_size)
                first = min(rank * rows, grad.shape[0])
                local[index] = grad[first : first + rows]
                starts[index] = first * grad.shape[1]
            packer = ShardedPacker(
                case["packer"], case["packer"].sizes, _Recorder(dist.group.WORLD)
            )
            plan = packer.plan(case["scores"])
            chosen = packer.coordinates(plan, local)
            results.append(
                {i: None if c is None else c.long().sort().values + starts[i] for i, c in chosen.items()}
            )
        torch.save(results, Path(out_dir) / f"packer{rank}.pt")
        leave_together()
    finally:
        dist.destroy_process_group()


def fsdp_clip_norm_worker(rank: int, world_size: int, store: str, out_dir: str, rest: str) -> None:
    """Each step, the norm BlockLLM clips against under FSDP2 (each rank half the batch) beside
    the whole batch's gradient norm from an unsharded twin with the same weights, reloaded every
    step so that only the accounting is compared: the shards' squares summed over the ranks."""
    _, model, opt = _setup(rank, world_size, store, {"rest": rest, "max_grad_norm": None})
    try:
        twin = make_model()
        norms, ratios = [], []
        for tokens in batches():
            twin.load_state_dict(_full_params(model))
            twin.zero_grad(set_to_none=True)
            twin(input_ids=tokens, labels=tokens).loss.backward()
            whole = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
            half = tokens[rank * 4 // world_size : (rank + 1) * 4 // world_size]
            loss = model(input_ids=half, labels=half).loss
            loss.backward()
            norms.append(float(opt.clip_grad_norm_(1.0)))
            ratios.append(norms[-1] / float(whole))
            opt.step(loss=loss)
            opt.zero_grad(set_to_none=True)
        torch.save({"norms": norms, "ratios": ratios, "reselections": opt.num_reselections},
                   Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
        leave_together()
    finally:
        dist.destroy_process_group()


def single_process_clip_norms(rest: str) -> list[float]:
    """The norms one process clips against in the same training (the whole batch each step)."""
    model = make_model()
    opt = BlockLLM(model.named_parameters(), **OPTIMIZER_KWARGS, rest=rest)
    norms = []
    for tokens in batches():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        norms.append(float(opt.clip_grad_norm_(1.0)))
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
    return norms
