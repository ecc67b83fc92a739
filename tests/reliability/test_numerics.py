"""Bad numbers: NaN/inf losses and gradients at random steps, low precision, endless plateaus.

A step that sees a NaN/inf loss or gradient must change no parameter, no optimizer state and no
selection, and be counted (``num_skipped_steps``, in every metrics line of the CLI's loop, for
every optimizer). A loss that plateaus forever must not make the trigger thrash: at most one
selection per ``patience`` steps.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from blockllm import BlockLLM
from blockllm.app.training import TrainingRun
from tests.app.tiny import tiny_config
from tests.reliability.helpers import (
    COUNTS,
    digest,
    exact,
    lm_loss,
    params_snapshot,
    read_lines,
    same,
    state_snapshot,
    tiny_llama,
    token_batches,
)

NAN, INF = float("nan"), float("inf")
GRAD_FAULTS = {"nan-grad": NAN, "inf-grad": INF, "-inf-grad": -INF, "huge-grad": 1e30}
LOSS_FAULTS = {"nan-loss": NAN, "inf-loss": INF, "nan-loss-tensor": torch.tensor(NAN)}


def _comparable(snapshot: dict) -> dict:
    snapshot = dict(snapshot)
    section = dict(snapshot.get("blockllm", {}))
    section.pop("num_skipped_steps", None)  # the one thing a skip changes
    snapshot["blockllm"] = section
    return snapshot


def inject_and_train(steps, seed, *, selection="tensor", trigger="interval", patience=1,
                     dtype=torch.float32, micro_batches=1, rate=0.2, rest="sign"):  # fmt: skip
    """Train a tiny Llama, injecting a random fault into about ``rate`` of the steps.

    Every injected step must be skipped with nothing changed; every other step must update.
    That is the whole-step contract, which holds when the rest rule steps in ``step()``
    (``rest_in_backward=False``) or there is none; in the hooks it is per tensor, pinned in
    tests/optim/test_rest.py.
    """
    model = tiny_llama().to(dtype)
    opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, trigger=trigger,
                   patience=patience, selection=selection, rest=rest,
                   rest_in_backward=False)  # fmt: skip
    rng = random.Random(seed)
    batches = token_batches(8)
    faults = [*GRAD_FAULTS, *LOSS_FAULTS]
    if dtype == torch.float16:
        faults.remove("huge-grad")  # 1e30 is not an fp16 number (inf-grad covers the overflow)
    injected = 0
    first_losses, last_losses = [], []
    for step in range(steps):
        fault = rng.choice(faults) if rng.random() < rate else None
        params_before = params_snapshot(model)
        state_before = _comparable(state_snapshot(opt))
        skipped_before, steps_before = opt.num_skipped_steps, opt.num_steps
        # With rest="none" a selection step's ranking closes with the first backward; a later
        # micro-batch's gradient of a tensor left out is dropped unused, like a frozen tensor's,
        # and rightly does not skip the step, so there later micro-batches are poisoned only
        # outside selections. A rest rule keeps every gradient and scores it at the step.
        closes_early = opt.selection_pending and rest == "none"
        poisoned_micro = 0 if closes_early else rng.randrange(micro_batches)
        total = 0.0
        for micro in range(micro_batches):
            handle = None
            if fault in GRAD_FAULTS and micro == poisoned_micro:
                # Any tensor that will get a gradient now: on a selection step every candidate
                # (the scoring hooks must notice), otherwise a selected one.
                target = rng.choice([p for p in model.parameters() if p.requires_grad])
                value = GRAD_FAULTS[fault]
                handle = target.register_hook(
                    lambda grad, value=value: torch.full_like(grad, value)
                )
            loss = lm_loss(model, batches[(step * micro_batches + micro) % len(batches)])
            (loss / micro_batches).backward()
            total += loss.item() / micro_batches
            if handle is not None:
                handle.remove()
        passed = LOSS_FAULTS.get(fault, total)
        opt.step(loss=passed)
        if fault is None:
            assert opt.num_skipped_steps == skipped_before, f"step {step} skipped without a fault"
            assert opt.num_steps == steps_before + 1
            (first_losses if step < steps // 4 else last_losses).append(total)
        else:
            injected += 1
            assert opt.num_skipped_steps == skipped_before + 1, f"{fault} at step {step} applied"
            assert same(params_snapshot(model), params_before), f"{fault} changed parameters"
            assert same(_comparable(state_snapshot(opt)), state_before), f"{fault} changed state"
        assert opt.num_selected <= opt.budget
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Training went on around the faults.
    assert sum(last_losses[-10:]) / 10 < sum(first_losses[:10]) / 10
    COUNTS["faults injected (optimizer)"] += injected
    COUNTS["steps with faults around them"] += steps
    return opt, injected


CONFIGS = [
    pytest.param(dict(), id="tensor-every-step"),
    pytest.param(dict(selection="mask", trigger="loss", patience=3), id="mask-loss-trigger"),
    pytest.param(dict(dtype=torch.bfloat16, patience=2), id="bf16"),
    pytest.param(dict(dtype=torch.float16, patience=2), id="fp16"),
    pytest.param(dict(micro_batches=2, patience=2), id="accumulation"),
    pytest.param(dict(rest="none", patience=2), id="frozen-rest"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_injected_faults_are_skipped_with_nothing_changed(config):
    opt, injected = inject_and_train(60, seed=0, **config)
    assert injected >= 5


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_injected_faults_are_skipped_with_nothing_changed_long(config):
    opt, injected = inject_and_train(1000, seed=1, **config)
    assert injected >= 150


def test_low_precision_overflow_is_skipped_and_master_weights_stay_exact():
    """fp16 gradients overflow to inf long before fp32 ones: skipped, masters untouched."""
    model = tiny_llama().half()
    # The rest in step(): a real overflow in a late backward must not follow rest steps taken.
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.8, trigger="interval", patience=3,
                   rest_in_backward=False)  # fmt: skip
    batches = token_batches(4)
    overflowed = 0
    for step in range(12):
        loss = lm_loss(model, batches[step % 4])
        # Gradients of about 1e6 reach the fp16 logits: far above fp16's largest value (65504),
        # so the backward overflows for real, as an unscaled fp16 loss spike does.
        scale = 1e9 if step % 4 == 3 else 1.0
        masters = {p: s["master"].clone() for p, s in opt.state.items() if "master" in s}
        params = params_snapshot(model)
        skipped = opt.num_skipped_steps
        (loss.float() * scale).backward()
        opt.step(loss=loss)
        if scale > 1:
            assert opt.num_skipped_steps == skipped + 1
            assert same(params_snapshot(model), params)
            assert all(torch.equal(opt.state[p]["master"], m) for p, m in masters.items())
            overflowed += 1
        else:
            assert opt.num_skipped_steps == skipped
        opt.zero_grad(set_to_none=True)
        for name, param in model.named_parameters():
            state = opt.state.get(param, {})
            if "master" in state and opt.coordinates(name) is None:
                # the fp16 weight is exactly its fp32 master, rounded
                assert torch.equal(state["master"].half(), param.detach())
    assert overflowed == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- through the CLI's loop


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * INF


class _StepDigests:
    """A Progress that records the digest of the model and optimizer state after every step."""

    def __init__(self):
        self.training_run = None
        self.params: dict[int, str] = {}
        self.states: dict[int, str] = {}

    def start(self, total, initial):
        pass

    def update(self, record):
        optimizer = self.training_run.optimizer
        self.params[record["step"]] = digest(self.training_run.model.state_dict())
        state = {
            f"{number}.{key}": value
            for number, entry in enumerate(optimizer.state.values())
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
        }
        self.states[record["step"]] = digest(state)

    def close(self):
        pass


def _poisoned_run(config, out_dir, cache_dir, bad_steps, fault, *, resume=False):
    digests = _StepDigests()
    training_run = TrainingRun(config, out_dir, cache_dir=cache_dir, progress=digests, resume=resume)
    digests.training_run = training_run
    training_run.setup()
    clean_loss, clean_step = training_run.workload.loss, training_run._train_step  # noqa: SLF001
    in_training = []

    def loss(model, batch):
        value, count = clean_loss(model, batch)
        # Only training batches: evaluation uses the same loss function and must stay clean.
        if in_training and training_run.step + 1 in bad_steps:
            value = value * NAN if fault == "nan-loss" else _PoisonGradient.apply(value)
        return value, count

    def train_step():
        in_training.append(True)
        try:
            return clean_step()
        finally:
            in_training.clear()

    training_run.workload.loss = loss
    training_run._train_step = train_step  # noqa: SLF001
    return training_run, digests


def _train(training_run):
    try:
        training_run.train()
    finally:
        training_run.cleanup()


LOOP_CASES = [
    pytest.param("blockllm", "nan-loss", dict(), id="blockllm-nan-loss"),
    pytest.param("blockllm", "inf-grad", dict(precision="bf16"), id="blockllm-inf-grad-bf16"),
    pytest.param("adamw", "inf-grad", dict(), id="adamw-inf-grad"),
    pytest.param("adamw", "nan-loss", dict(grad_clip=0.0), id="adamw-nan-loss-no-clipping"),
]


@pytest.mark.parametrize(("optimizer", "fault", "overrides"), LOOP_CASES)
def test_the_loop_skips_bad_steps_for_every_optimizer_and_counts_them(
    optimizer, fault, overrides, tmp_path, cache_dir
):
    bad_steps = {2, 5, 6}
    config = tiny_config(max_steps=8, eval_every=4, save_every=4, optimizer=optimizer,
                         patience=2, **overrides)  # fmt: skip
    training_run, digests = _poisoned_run(config, tmp_path, cache_dir, bad_steps, fault)
    _train(training_run)
    lines = read_lines(tmp_path)
    assert [line["num_skipped_steps"] for line in lines] == [0, 1, 1, 1, 2, 3, 3, 3]
    for step in range(2, 9):
        unchanged = digests.params[step] == digests.params[step - 1]
        assert unchanged == (step in bad_steps), f"step {step}: parameters changed={not unchanged}"
        if step in bad_steps:
            assert digests.states[step] == digests.states[step - 1]
    assert all(math.isfinite(line["eval_loss"]) for line in lines if "eval_loss" in line)
    assert training_run.summary["num_skipped_steps"] == 3
    COUNTS["faults injected (training loop)"] += len(bad_steps)


def test_skip_counts_survive_a_crash_and_resume(tmp_path, cache_dir):
    bad_steps = {3, 6}
    config = tiny_config(max_steps=8, eval_every=4, save_every=4, patience=2)
    straight, _ = _poisoned_run(config, tmp_path / "straight", cache_dir, bad_steps, "nan-loss")
    _train(straight)

    crashing, digests = _poisoned_run(
        config, tmp_path / "run", cache_dir, bad_steps, "nan-loss"
    )
    original_update = digests.update

    def crash_after_step_5(record):
        original_update(record)
        if record["step"] == 5:
            raise RuntimeError("simulated crash")

    digests.update = crash_after_step_5
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(crashing)
    resumed, _ = _poisoned_run(config, tmp_path / "run", cache_dir, bad_steps, "nan-loss",
                                   resume=True)  # fmt: skip
    _train(resumed)
    assert exact(read_lines(tmp_path / "run")) == exact(read_lines(tmp_path / "straight"))
    assert read_lines(tmp_path / "run")[-1]["num_skipped_steps"] == 2


# ---------------------------------------------------------------------- endless plateaus


def _selections_under(losses, patience, trigger="loss"):
    """Step numbers at which a new selection is committed while ``losses`` are observed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, trigger=trigger,
                   patience=patience)  # fmt: skip
    inputs = torch.randn(8, 4)
    committed = []
    for step, value in enumerate(losses):
        model(inputs).pow(2).mean().backward()
        before = opt.num_selections
        opt.step(loss=value)
        if opt.num_selections > before:
            committed.append(step)
        opt.zero_grad(set_to_none=True)
    return committed, opt


def _check_no_thrash(losses, patience):
    committed, opt = _selections_under(losses, patience)
    gaps = [b - a for a, b in zip(committed, committed[1:])]
    assert all(gap >= patience for gap in gaps), (patience, gaps)
    finite = sum(1 for value in losses if math.isfinite(value))
    assert opt.num_reselections <= finite // patience
    return committed


SHAPES = {
    "flat": lambda t: 2.0,
    "noisy": lambda t: 2.0 + 0.01 * math.sin(7.3 * t),
    "rising": lambda t: 1.0 + 1e-3 * t,
    "sawtooth": lambda t: 2.0 - 0.1 * (t % 5),
    "flat-with-nan": lambda t: NAN if t % 7 == 3 else 2.0,
}


@pytest.mark.parametrize("patience", [1, 2, 5, 13])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_plateau_forever_reselects_at_most_once_per_patience(shape, patience):
    losses = [SHAPES[shape](t) for t in range(160)]
    committed = _check_no_thrash(losses, patience)
    if shape == "flat":
        # A true plateau is what the trigger is for: it fires once per `patience` steps.
        assert [b - a for a, b in zip(committed, committed[1:])] == [patience] * (
            len(committed) - 1
        )
        assert len(committed) >= 160 // patience - 1
    COUNTS["plateau steps"] += len(losses)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    patience=st.integers(1, 20),
    losses=st.lists(
        st.one_of(
            st.floats(1.0, 1.0 + 1e-6),
            st.floats(0.0, 10.0),
            st.sampled_from([NAN, INF, -INF, 2.0]),
        ),
        min_size=1,
        max_size=250,
    ),
)
def test_no_loss_sequence_makes_the_trigger_thrash(patience, losses):
    torch.set_num_threads(1)
    _check_no_thrash(losses, patience)
    COUNTS["plateau steps"] += len(losses)
