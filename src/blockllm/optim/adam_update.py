"""The Adam(W) update for the selected blocks, kept apart from any selection logic.

The arithmetic is torch's own: :func:`torch.optim.adam.adam` with decoupled weight decay, the
same kernels ``torch.optim.AdamW`` runs (fused, foreach or for-loop). BlockLLM only decides
*which* tensors go in. Three kinds of entries are fed to it:

* a whole tensor in fp32 (or any full-precision dtype): the parameter itself;
* a whole low-precision tensor (bf16/fp16): its fp32 master copy, written back afterwards;
* a partial tensor: a compact 1-D vector of its selected coordinates (gathered from the master
  copy or the parameter), scattered back afterwards. Its moments are compact too, so a partly
  selected embedding costs state for the selected coordinates only;
* a bf16 block without a master copy (``master_weights=False``): its values are widened to fp32
  a bounded chunk at a time, stepped, and rounded back into the bf16 weight, stochastically
  unless ``stochastic_rounding=False``. Adam's arithmetic is the same fp32 arithmetic; what is
  lost is the master's 16 extra bits of each weight, which stochastic rounding keeps right on
  average instead of exactly (4 bytes less per updated coordinate).

Moments stored in bf16 (``moment_dtype="bfloat16"``) are widened to fp32 one block at a time,
updated by the same kernel, and rounded back stochastically: with beta2 = 0.999 the second
moment moves by 0.1 % of itself per step, below half a bf16 unit (0.2 %), so round-to-nearest
would freeze it; stochastic rounding keeps it right on average (:mod:`.rounding`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.adam import adam

from blockllm.optim.rounding import RoundingGenerators, stochastic_round_to_bf16
from blockllm.selection.coordinates import Selected, gather, scatter_

LOW_PRECISION = (torch.bfloat16, torch.float16)
_FUSED_DEVICES = ("cpu", "cuda")
#: The most gradient entries widened to fp32 at once in a step of bf16 weights (64 MB of
#: fp32): big enough that the fused kernel's launches stay few (llama-1b's block of 134M
#: entries: about eight ranges).
WIDENING_CHUNK = 1 << 24
#: What ``keep_moments`` keeps of a block while it is away from the selection.
PARKED_KEYS = ("step", "exp_avg", "exp_avg_sq")


def needs_master(param: torch.Tensor, master_weights: bool = True) -> bool:
    """Whether a block of ``param`` gets an fp32 master copy. fp16 always does: there is no
    stochastic rounding to fp16 here, and round-to-nearest would lose Adam's small steps."""
    if param.dtype == torch.float16:
        return True
    return master_weights and param.dtype == torch.bfloat16


def init_state(
    param: torch.Tensor,
    coordinates: Selected | None,
    fused: bool,
    moment_dtype: torch.dtype = torch.float32,
    master_weights: bool = True,
) -> dict[str, Any]:
    """Fresh state for a block entering the selection: zero moments (fp32, or bf16 when
    ``moment_dtype`` asks), step 0, and for a low-precision block an fp32 master unless
    ``master_weights`` is False (:func:`needs_master`)."""
    with torch.no_grad():
        value = param.detach() if coordinates is None else gather(param.detach(), coordinates)
        master = needs_master(param, master_weights)
        work = value.float() if master else value
        # float32 (the default) means "the update's own dtype", as torch.optim.AdamW keeps them:
        # fp32 for a low-precision block, with or without its master.
        update_dtype = torch.float32 if param.dtype in LOW_PRECISION else param.dtype
        moments = update_dtype if moment_dtype == torch.float32 else moment_dtype
        state: dict[str, Any] = {
            # Same placement as torch.optim.AdamW so the bias corrections match bit for bit.
            "step": torch.zeros((), dtype=torch.float32, device=param.device)
            if fused
            else torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros_like(work, dtype=moments, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(
                work, dtype=moments, memory_format=torch.preserve_format
            ),
        }
        if master:
            # ``work`` is already a new fp32 tensor (the widened copy): no second copy of it.
            state["master"] = work
    return state


@dataclass
class UpdateBatch:
    """Flat lists for one param group, in the shape :func:`torch.optim.adam.adam` takes."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    # (parameter, coordinates or None, updated tensor) to copy back after the kernel ran.
    write_back: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(
        default_factory=list
    )
    # Blocks whose moments are stored narrower than their update runs: (param, grad, exp_avg,
    # exp_avg_sq, step), each run on its own so that only one block's fp32 moments exist at once.
    narrow: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # bf16 blocks without a master copy: (param, coordinates or None, grad, state).
    unmastered: list[tuple[torch.Tensor, Selected | None, torch.Tensor, dict]] = field(
        default_factory=list
    )
    rounding: RoundingGenerators | None = None
    # How an unmastered block's fp32 result is written into its bf16 weight.
    stochastic: bool = True

    def add(
        self,
        param: torch.Tensor,
        coordinates: Selected | None,
        grad: torch.Tensor,
        state: dict,
    ) -> None:
        """Queue one block; ``grad`` is already gathered to ``coordinates`` when they are set."""
        master = state.get("master")
        if master is None and param.dtype in LOW_PRECISION:
            self.unmastered.append((param, coordinates, grad, state))
            return
        if coordinates is None:
            target = master if master is not None else param
            if master is not None:
                self.write_back.append((param, None, master))
        else:
            target = master if master is not None else gather(param.detach(), coordinates)
            self.write_back.append((param, coordinates, target))
        # A bf16 gradient is widened to the master's fp32 in run(), a bounded slice of the block
        # at a time: widened here, the whole block's fp32 gradients (4 B per selected entry,
        # 0.5 GB on llama-1b) would sit beside the bf16 ones until the kernel ran.
        if state["exp_avg"].dtype != target.dtype:
            self.narrow.append((target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
            return
        self.params.append(target)
        self.grads.append(grad)
        self.exp_avgs.append(state["exp_avg"])
        self.exp_avg_sqs.append(state["exp_avg_sq"])
        self.steps.append(state["step"])

    def run(self, group: dict[str, Any]) -> None:
        for start, stop in widening_chunks(self.params, self.grads):
            grads = [
                grad.to(param.dtype)
                for param, grad in zip(self.params[start:stop], self.grads[start:stop])
            ]
            _adamw(
                group,
                self.params[start:stop],
                grads,
                self.exp_avgs[start:stop],
                self.exp_avg_sqs[start:stop],
                self.steps[start:stop],
            )
            del grads
        if self.narrow and self.rounding is None:
            raise RuntimeError("BlockLLM: moments stored in bf16 need rounding generators")
        for param, grad, exp_avg, exp_avg_sq, step in self.narrow:
            wide_avg, wide_avg_sq = exp_avg.to(param.dtype), exp_avg_sq.to(param.dtype)
            _adamw(group, [param], [grad.to(param.dtype)], [wide_avg], [wide_avg_sq], [step])
            generator = self.rounding.for_tensor(param)
            exp_avg.copy_(stochastic_round_to_bf16(wide_avg.float(), generator))
            exp_avg_sq.copy_(stochastic_round_to_bf16(wide_avg_sq.float(), generator))
        for param, coordinates, grad, state in self.unmastered:
            self._step_unmastered(group, param, coordinates, grad, state)
        with torch.no_grad():
            for param, coordinates, updated in self.write_back:
                if coordinates is None:
                    param.copy_(updated)
                else:
                    scatter_(param, coordinates, updated)

    def _step_unmastered(
        self,
        group: dict[str, Any],
        param: torch.Tensor,
        coordinates: Selected | None,
        grad: torch.Tensor,
        state: dict,
    ) -> None:
        """Adam on a bf16 block with no master: fp32 copies of its values, gradient and (bf16)
        moments exist one chunk of ``WIDENING_CHUNK`` entries at a time, so the step's transient
        memory stays bounded whatever the block's size.

        Adam is elementwise, so chunks change no bit of the update, nor of the stochastic
        rounding of the weights (one stream, drawn in entry order); with bf16 moments the three
        roundings of a chunk interleave their draws, so chunks change which noise rounds what,
        not its distribution. The step counter, which torch's kernel increments per call, is
        advanced once for the block.
        """
        generator = None
        narrow = state["exp_avg"].dtype != torch.float32
        stochastic = self.stochastic and param.dtype == torch.bfloat16
        if narrow or stochastic:
            if self.rounding is None:
                raise RuntimeError("BlockLLM: bf16 steps without masters need rounding generators")
            generator = self.rounding.for_tensor(param)
        with torch.no_grad():
            values = param.detach() if coordinates is None else gather(param.detach(), coordinates)
            parts = (values, grad, state["exp_avg"], state["exp_avg_sq"])
            if all(part.is_contiguous() for part in parts):
                flat = [part.view(-1) for part in parts]
                bounds = range(0, values.numel(), WIDENING_CHUNK) or range(1)
                chunks = [[part[start : start + WIDENING_CHUNK] for part in flat] for start in bounds]
            else:  # a strided tensor (rare): one chunk, as it is
                chunks = [list(parts)]
            done = state["step"].clone()
            for value, chunk_grad, exp_avg, exp_avg_sq in chunks:
                wide = value.float()
                # fp32 moments are their own .float(): the kernel updates them in place.
                wide_avg, wide_avg_sq = exp_avg.float(), exp_avg_sq.float()
                counter = done.clone()
                _adamw(group, [wide], [chunk_grad.float()], [wide_avg], [wide_avg_sq], [counter])
                if narrow:
                    exp_avg.copy_(stochastic_round_to_bf16(wide_avg, generator))
                    exp_avg_sq.copy_(stochastic_round_to_bf16(wide_avg_sq, generator))
                value.copy_(
                    stochastic_round_to_bf16(wide, generator) if stochastic else wide.to(value.dtype)
                )
            state["step"].copy_(counter)
            if coordinates is not None:
                scatter_(param, coordinates, values)


def widening_chunks(
    params: list[torch.Tensor], grads: list[torch.Tensor], limit: int = WIDENING_CHUNK
) -> list[tuple[int, int]]:
    """Index ranges of ``params`` to step together so that at most ``limit`` widened gradient
    entries (or one tensor's, when it alone is larger) exist at once.

    Gradients already in their parameter's dtype cost nothing to pass, so a full-precision
    batch is one range: the kernel's multi-tensor launch stays whole. The Adam kernels are
    elementwise per tensor, so splitting the lists changes no bit of the result.
    """
    chunks: list[tuple[int, int]] = []
    start, widened = 0, 0
    for index, (param, grad) in enumerate(zip(params, grads)):
        size = grad.numel() if grad.dtype != param.dtype else 0
        if widened and widened + size > limit:
            chunks.append((start, index))
            start, widened = index, 0
        widened += size
    if start < len(params):
        chunks.append((start, len(params)))
    return chunks


def _adamw(
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
) -> None:
    """torch's AdamW step on lists of same-dtype tensors, with the group's hyperparameters."""
    beta1, beta2 = group["betas"]
    fused, foreach = resolve_implementation(group, params)
    adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=foreach,
        fused=fused,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def update_selected_(
    param_groups: list[dict[str, Any]],
    state: dict[torch.Tensor, dict[str, Any]],
    grads: dict[int, torch.Tensor],
    selection: dict[int, torch.Tensor | None],
    index_of: Callable[[torch.Tensor], int | None],
    local: Callable[[torch.Tensor], torch.Tensor],
    num_steps: int,
    entry_warmup: int,
    parked: dict[int, dict[str, torch.Tensor]] | None = None,
    moment_dtype: torch.dtype = torch.float32,
    rounding: RoundingGenerators | None = None,
    master_weights: bool = True,
    stochastic_rounding: bool = True,
) -> None:
    """One AdamW step on every selected block that has a gradient in ``grads``.

    ``grads`` and ``selection`` are keyed by candidate index (``index_of(param)``); a block
    without state gets fresh state (zero moments, master copy) here, or, entering whole with
    moments ``parked`` from an earlier turn (``keep_moments``), those moments and their step
    count. Blocks still in their entry warmup run in batches of their own, at a scaled lr.
    Fresh moments are stored in ``moment_dtype``; bf16 ones are rounded with ``rounding``, and
    so are the weights of bf16 blocks without masters (``master_weights=False``), stochastically
    unless ``stochastic_rounding`` is False.
    """
    for group in param_groups:
        batches: dict[float, UpdateBatch] = defaultdict(
            lambda: UpdateBatch(rounding=rounding, stochastic=stochastic_rounding)
        )
        for param in group["params"]:
            index = index_of(param)
            if index is None or index not in grads:
                continue
            coordinates = selection[index]
            held = state[param]
            if not held:
                fused, _ = resolve_implementation(group, [param])
                held.update(
                    init_state(local(param), coordinates, fused, moment_dtype, master_weights)
                )
                if parked and coordinates is None and index in parked:
                    held.update(parked.pop(index))
            factor = _warmup_factor(held, num_steps, entry_warmup)
            batches[factor].add(local(param), coordinates, grads[index], held)
        for factor, batch in batches.items():
            batch.run(group if factor == 1.0 else {**group, "lr": group["lr"] * factor})


def _warmup_factor(state: dict[str, Any], num_steps: int, entry_warmup: int) -> float:
    """The lr multiplier of a block whose state has made ``state["step"]`` updates.

    A block enters with zero moments, so Adam's first updates are about ``lr * sign(g)`` per
    coordinate, several times larger than its steady-state steps; a short linear ramp keeps a
    reselection from kicking the loss up. A block in since the first update is left to the
    learning-rate schedule's own warmup.
    """
    if entry_warmup <= 0:
        return 1.0  # without reading the step counter, which may sit on a GPU
    done = int(state["step"])
    if done >= num_steps:
        return 1.0
    return min(1.0, (done + 1) / entry_warmup)


def resolve_implementation(group: dict[str, Any], tensors: list[torch.Tensor]) -> tuple[bool, bool]:
    """Pick (fused, foreach) the way the group asks; ``None`` means the fastest safe choice.

    torch.optim.AdamW defaults to the for-loop on CPU; we default to the fused kernel wherever it
    exists (CPU and CUDA), since the optimizer step is pure overhead for our users.
    """
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused is None and foreach is None:
        fused = all(t.device.type in _FUSED_DEVICES and t.is_floating_point() for t in tensors)
        foreach = False
    return bool(fused), bool(foreach)


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d bool tensor, on the first tensor's device: no tensor holds a NaN or an infinity
    (None for no tensors). Nothing is read on the host, so flags can be combined and read once.

    One multi-tensor 2-norm per (device, dtype), the kernel ``clip_grad_norm_`` uses: NaN and
    inf survive it, and it is the cheapest full pass we measured (sums and inf-norms were several
    times slower on CPU). A norm that overflows (entries near 1e19 and up) also reads as
    non-finite; a gradient that large is not worth applying either.
    """
    if not tensors:
        return None
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_kind[(tensor.device, tensor.dtype)].append(tensor)
    device = tensors[0].device
    norms = [
        norm.float().to(device)
        for group in by_kind.values()
        for norm in torch._foreach_norm(group, 2)
    ]
    return torch.isfinite(torch.stack(norms)).all()


def flags_all_true(flags: list[torch.Tensor | None]) -> bool:
    """Every flag of :func:`finite_flag` (or any 0-d bool tensor) true, read with one host sync."""
    present = [flag for flag in flags if flag is not None]
    if not present:
        return True
    device = present[0].device
    return bool(torch.stack([flag.to(device) for flag in present]).all())
