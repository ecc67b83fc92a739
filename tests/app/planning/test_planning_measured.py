"""``blockllm estimate`` against a measured CPU run of the tiny preset, AdamW and BlockLLM.

What is compared, category by category (both sides in bytes):

* weights, optimizer state, master weights and the gradients held after ``step()``: the app's
  :class:`~blockllm.app.training.memory.MemoryTracker` (``tensor_bytes``: BlockLLM's own
  ``memory_report()``), sampled where the training loop samples it, after ``step()`` and before
  ``zero_grad()``, over two steps (the first is BlockLLM's selection step);
* the transient gradient: the largest gradient that lands during a backward, from a hook on
  every parameter (``Tensor.register_hook`` sees each gradient as autograd makes it);
* activations: the bytes of the tensors autograd saves during the forward, from
  ``saved_tensors_hooks`` (each storage once, parameters excluded), plus the loss's two
  ``tokens x vocab`` gradients, from hooks on the log-probabilities and the logits.

The estimate leaves out bytes it calls negligible: Adam's step counters, BlockLLM's row ids, 0-d
saved scalars, and the storage around the input ids (a view of the block that holds the targets
too). Those are measured too, and they are the tolerance: the estimate must be
within them of the measured total (and so within 10 %).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from blockllm.app.bench.allocations import peak_allocated
from blockllm.app.methods import get_optimizer_spec
from blockllm.app.models.presets import build_llama
from blockllm.app.planning import EstimateSettings, estimate_memory
from blockllm.app.planning.model_shapes import shape_of_config
from blockllm.app.training import RunConfig
from blockllm.app.training.memory import MemoryTracker

BATCH, SEQ_LEN, VOCAB = 4, 64, 8192


class Measured:
    """The measured bytes of a few training steps, by category."""

    def __init__(self) -> None:
        self.saved = 0  # activations saved by the forward (largest over the steps)
        self.scalars = 0  # of which 0-d tensors (the estimate leaves them out)
        self.slack = 0  # of which storage around a saved view (the ids are a view of the block)
        self.loss_transient = 0
        self.landing = 0  # the largest gradient that landed in a backward
        self.moments = 0  # exp_avg + exp_avg_sq (largest over the steps)
        self.rule_state = 0  # the factored rest rule's row/column/vector statistics (no counters)
        self.rule_unstepped = 0  # of the estimate's, those of tensors no rest step reached yet


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Records each storage autograd saves inside the ``with`` block (parameters excluded)."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.storages: dict[int, tuple[int, int, int]] = {}  # bytes, dims, the view's own bytes
        super().__init__(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            own = tensor.numel() * tensor.element_size()
            self.storages.setdefault(storage.data_ptr(), (storage.nbytes(), tensor.dim(), own))
        return tensor

    @property
    def total(self) -> int:
        return sum(size for size, _, _ in self.storages.values())

    @property
    def scalars(self) -> int:
        return sum(size for size, dims, _ in self.storages.values() if dims == 0)

    @property
    def slack(self) -> int:
        return sum(size - own for size, _, own in self.storages.values())


def record_bytes(sizes: list[int], grad: torch.Tensor) -> None:
    sizes.append(grad.numel() * grad.element_size())


def run_steps(
    optimizer: str, steps: int = 2, precision: str = "fp32", **knobs: str
) -> tuple[Measured, MemoryTracker, torch.nn.Module]:
    config = RunConfig.create(
        "pretrain", "tiny", optimizer=optimizer, vocab_size=VOCAB, seq_len=SEQ_LEN,
        batch_size=BATCH, patience=10, precision=precision, **knobs,
    )  # fmt: skip
    model = build_llama("tiny", vocab_size=VOCAB, max_seq_len=SEQ_LEN, seed=0)
    if precision == "bf16-pure":  # as the training loop does
        model = model.to(torch.bfloat16)
    spec = get_optimizer_spec(optimizer)
    opt = spec.build(model, config)
    tracker = MemoryTracker(torch.device("cpu"))
    measured = Measured()

    def on_landing(grad: torch.Tensor) -> None:
        measured.landing = max(measured.landing, grad.numel() * grad.element_size())

    for param in model.parameters():
        param.register_hook(on_landing)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        blocks = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=generator)
        saved = SavedTensors(parameters)
        transient: list[int] = []
        with saved:
            logits = model(input_ids=blocks[:, :-1]).logits
            # F.cross_entropy as the workload computes it, in its two halves so that both
            # gradients of the loss's backward can be seen.
            log_probs = F.log_softmax(logits.flatten(0, 1), dim=-1)
            loss = F.nll_loss(log_probs, blocks[:, 1:].flatten())
        for tensor in (logits, log_probs):
            tensor.register_hook(functools.partial(record_bytes, transient))
        del logits, log_probs
        measured.saved = max(measured.saved, saved.total)
        measured.scalars = max(measured.scalars, saved.scalars)
        measured.slack = max(measured.slack, saved.slack)
        loss.backward()
        measured.loss_transient = max(measured.loss_transient, sum(transient))
        if spec.takes_loss:
            opt.step(loss=float(loss.detach()))
        else:
            opt.step()
        # Where the training loop samples: after step(), before zero_grad().
        tracker.sample(model, opt)
        measured.moments = max(measured.moments, sum(
            value.numel() * value.element_size()
            for state in opt.state.values()
            for key, value in state.items()
            if key in ("exp_avg", "exp_avg_sq")
        ))  # fmt: skip
        opt.zero_grad(set_to_none=True)
    if optimizer == "blockllm":
        rule = opt.state_dict()["blockllm"]["rest"]["rule"]
        measured.rule_state = sum(
            value.numel() * value.element_size()
            for state in rule.values() for key, value in state.items() if key != "step"
        )  # fmt: skip
        measured.rule_unstepped = sum(
            4 * (p.numel() // p.shape[-1] + p.shape[-1] if p.dim() >= 2 else p.numel())
            for name, p in model.named_parameters() if name not in rule
        )  # fmt: skip
    return measured, tracker, model


@pytest.mark.parametrize(
    ("optimizer", "moment_dtype", "precision", "masters"),
    [("adamw", "float32", "fp32", True), ("blockllm", "float32", "fp32", True),
     ("blockllm", "bfloat16", "fp32", True), ("blockllm", "float32", "bf16-pure", True),
     ("blockllm", "float32", "bf16-pure", False)],
)  # fmt: skip
def test_estimate_matches_a_measured_tiny_run(optimizer, moment_dtype, precision, masters):
    knobs = (
        {} if optimizer == "adamw" else {"moment_dtype": moment_dtype, "master_weights": masters}
    )
    measured, tracker, model = run_steps(optimizer, precision=precision, **knobs)
    peak = tracker.peak
    plan = estimate_memory(
        shape_of_config(model.config, name="tiny"),
        EstimateSettings(batch_size=BATCH, seq_len=SEQ_LEN, precision=precision, sparsity=0.9,
                         moment_dtype=moment_dtype, master_weights=masters),
        [optimizer],
    )  # fmt: skip
    row = plan.rows[0]

    # Category by category: exact where the estimate counts every byte.
    assert row.weights == peak["params"]
    assert row.gradients - row.gradient_transient == peak["grads"]
    # The factored rest step is taken in place on every device: no full-size direction
    # (test_rest_work_is_the_gpu_paths_temporaries).
    assert row.rest_work == 0
    assert row.gradient_transient == (measured.landing if optimizer == "blockllm" else 0)
    # fp32 masters of the block's coordinates under bf16-pure (4 bytes each), none in fp32.
    assert row.master_weights == peak["master_weights"]
    assert (row.master_weights > 0) == (precision == "bf16-pure" and masters)
    # 8 (bf16 moments: 4) bytes per block coordinate, plus the default rest rule's statistics
    # (factored: fp32 per row and column) for every candidate, counting those that have had no
    # rest step yet (all the block's so far: their statistics appear when they leave it).
    assert row.optimizer_state == measured.moments + measured.rule_state + measured.rule_unstepped
    if optimizer == "blockllm":
        assert measured.rule_state > 0
    assert plan.activations.saved == measured.saved - measured.scalars - measured.slack
    assert plan.activations.loss_transient == measured.loss_transient

    # The totals: what the estimate calls negligible is all that separates them.
    left_out = (
        peak["optimizer_state"] - measured.moments - measured.rule_state
        + measured.scalars + measured.slack
    )  # fmt: skip
    measured_total = (
        peak["params"] + peak["grads"] + (measured.landing if optimizer == "blockllm" else 0)
        + peak["optimizer_state"] + peak["master_weights"]
        + measured.saved + measured.loss_transient
    )  # fmt: skip
    estimated_total = row.total(False)
    assert measured_total - left_out + measured.rule_unstepped == estimated_total
    assert abs(estimated_total - measured_total) <= 0.10 * measured_total
    assert left_out <= 0.01 * measured_total  # negligible, as the estimate assumes


@pytest.mark.parametrize(
    ("rest", "dtype"),
    [("factored", torch.float32), ("factored", torch.bfloat16), ("sign", torch.float32),
     ("sign", torch.bfloat16), ("colnorm", torch.float32), ("colnorm", torch.bfloat16)],
)  # fmt: skip
def test_rest_work_is_the_gpu_paths_temporaries(monkeypatch, rest, dtype):
    # The estimate's rest_work per entry, against the path a GPU takes (taken here on a CPU by
    # claiming the tensors are on an accelerator): the factored step in place, sign and colnorm
    # through the dense step; the final write and the passes cut into small slices so that
    # only full-size temporaries count.
    from blockllm.app.planning.method_memory import rest_work_bytes
    from blockllm.app.planning.model_shapes import TensorInfo
    from blockllm.config import BlockLLMConfig
    from blockllm.distributed.base import SingleProcess
    from blockllm.optim import rest_step
    from blockllm.selection import rest_rules, scorers
    from blockllm.selection.rest_rules import make_rest_rule

    monkeypatch.setattr(rest_rules, "_on_accelerator", lambda tensor: True)
    monkeypatch.setattr(rest_step, "_WRITE_SLICE_ELEMENTS", 4096)
    monkeypatch.setattr(rest_rules, "_ACCELERATOR_SLICE_ELEMENTS", 4096)  # the rule's own slices
    monkeypatch.setattr(scorers, "_NORM_SLICE_ELEMENTS", 4096)  # a bf16 gradient's norm
    shape = (1024, 512)
    weight = torch.nn.Parameter(torch.randn(shape).to(dtype))
    stepper = rest_step.RestStepper(
        make_rest_rule(rest, 0.99), lr_scale=1.0, weight_decay=0.0, params=[weight],
        groups=[{"lr": 1e-3, "weight_decay": 0.0}], comm=SingleProcess(), in_backward=True,
        held=lambda: False,
    )  # fmt: skip
    weight.grad = torch.randn(shape).to(dtype)
    measured = peak_allocated(lambda: stepper.release(0))
    assert weight.grad is None  # stepped and freed
    config = BlockLLMConfig(rest=rest, vocab_rest=None)
    estimated = rest_work_bytes(config, [TensorInfo("w", shape, linear=True, embedding=False, layer=0)], dtype.itemsize)
    # Beyond the full-size temporaries: the rule's vectors and a few slices (at least 16 rows).
    assert estimated <= measured <= estimated + 128 * 1024, (measured, estimated)
