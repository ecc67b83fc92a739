"""Soak: thousands of steps with a reselection (nearly) every step, and nothing grows.

Checked every 100 steps after a warm-up: resident memory, the number of live Python objects, the
post-accumulate-grad hooks on the parameters and BlockLLM's hook-owner registry; every step: the
optimizer state, master weights and gradients against bounds computed from the budget k (a leak of
one tensor per selection would cross them within a few hundred selections). A NaN loss every 97
steps keeps the skip path in the soak too.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from blockllm import BlockLLM
from blockllm.app.training import TrainingRun
from tests.app.tiny import tiny_config
from tests.reliability.helpers import (
    COUNTS,
    current_rss_bytes,
    hook_count,
    live_owner_entries,
    lm_loss,
    python_objects,
    tiny_llama,
    token_batches,
)

# Measured: after the warm-up, resident memory moves by under 0.2 MB over 2,500 steps and the
# live-object count by about a dozen. A leak of 2 kB or one Python object per selection would
# cross these bounds long before the end.
RSS_SLACK_BYTES = 4 * 2**20
OBJECT_SLACK = 100


def bounds(opt: BlockLLM, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes the optimizer may hold, from the budget: the memory contract of the README."""
    k = opt.budget
    named = dict(model.named_parameters())
    largest = max(named[name].numel() for name in opt.candidate_names)
    element = torch.finfo(dtype).bits // 8
    moments = 2 * 4 if dtype in (torch.bfloat16, torch.float16) else 2 * element
    return {
        # two moments and an int32 coordinate per selected coordinate, a step scalar per tensor
        "optimizer_state": k * (moments + 4) + 8 * opt.num_candidates,
        "master_weights": k * 4 if element < 4 else 0,
        # the selected coordinates' gradients, plus the dense gradients of the partly selected
        # tensors: each but the last takes a full cap (max_tensor_share of k), so at most
        # 1/share + 1 of them (mask: a score-ordered prefix that stops once it covers k)
        "grads": (k + partly_selected_limit(opt) * largest) * element,
    }


def partly_selected_limit(opt: BlockLLM) -> int:
    if opt.config.selection == "mask" or opt.config.max_tensor_share >= 1.0:
        return 1
    return int(1 / opt.config.max_tensor_share) + 1


def soak(steps, *, selection="tensor", trigger="interval", patience=1, dtype=torch.float32,
         nan_every=97, sample_every=100):  # fmt: skip
    python_objects()  # collect what earlier tests left, so it is not freed mid-soak
    model = tiny_llama().to(dtype)
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, trigger=trigger,
                   patience=patience, selection=selection)  # fmt: skip
    limits = bounds(opt, model, dtype)
    batches = token_batches(16)
    peaks = dict.fromkeys(limits, 0)
    samples = []
    for step in range(1, steps + 1):
        loss = lm_loss(model, batches[step % len(batches)])
        if nan_every and step % nan_every == 0:
            loss = loss * float("nan")
        loss.backward()
        opt.step(loss=loss)
        # Gradients and state both exist now, between step() and zero_grad().
        report = opt.memory_report()
        for name in peaks:
            peaks[name] = max(peaks[name], report[name])
        opt.zero_grad(set_to_none=True)
        if step % sample_every == 0:
            samples.append(
                {
                    "step": step,
                    "rss": current_rss_bytes(),
                    "objects": python_objects(),
                    "hooks": hook_count(model.parameters()),
                    "owners": live_owner_entries(),
                    "state_entries": len(opt.state),
                }
            )
    COUNTS["steps soaked"] += steps
    COUNTS["reselections soaked"] += opt.num_reselections
    return model, opt, samples, peaks, limits


def check_flat(model, opt, samples, peaks, limits, *, warmup: int) -> None:
    assert peaks["optimizer_state"] <= limits["optimizer_state"], (peaks, limits)
    assert peaks["master_weights"] <= limits["master_weights"], (peaks, limits)
    assert peaks["grads"] <= limits["grads"], (peaks, limits)
    assert opt.peak_selection_grad_bytes <= limits["grads"]  # no full-model gradient, ever
    assert all(torch.isfinite(p).all() for p in model.parameters())

    candidates = opt.num_candidates
    assert {s["hooks"] for s in samples} == {candidates}
    # The owner registry never grows (entries of optimizers collected meanwhile may go).
    assert max(s["owners"] for s in samples) <= samples[0]["owners"]
    assert max(s["state_entries"] for s in samples) <= candidates

    settled = [s for s in samples if s["step"] > warmup]
    objects = [s["objects"] for s in settled]
    assert max(objects) - objects[0] < OBJECT_SLACK, objects
    rss = [s["rss"] for s in settled]
    if rss[0] is not None:
        assert max(rss) - rss[0] < RSS_SLACK_BYTES, [r // 2**20 for r in rss]


@pytest.fixture(autouse=True)
def _quiet_info(caplog):
    # pytest keeps every captured log record until the test ends, and an in-process CLI test
    # earlier in the session leaves the root logger at INFO: one record per selection would then
    # look like a leak of one object per step. The soak measures blockllm, not pytest.
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.WARNING, logger="blockllm")


def test_short_soak_reselecting_every_step():
    """The default run's short form: 300 steps, a selection on every non-skipped step."""
    model, opt, samples, peaks, limits = soak(300, sample_every=60)
    assert opt.num_skipped_steps == 3
    assert opt.num_reselections >= 290
    check_flat(model, opt, samples, peaks, limits, warmup=60)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("selection", "trigger", "patience", "dtype"),
    [
        pytest.param("tensor", "interval", 1, torch.float32, id="tensor-every-step"),
        pytest.param("mask", "interval", 2, torch.float32, id="mask-every-2"),
        pytest.param("tensor", "loss", 2, torch.bfloat16, id="bf16-loss-trigger"),
    ],
)
def test_soak_2500_steps(selection, trigger, patience, dtype):
    steps = 2500
    model, opt, samples, peaks, limits = soak(
        steps, selection=selection, trigger=trigger, patience=patience, dtype=dtype
    )
    assert opt.num_skipped_steps == steps // 97
    if trigger == "interval":
        # One selection per `patience` updated steps; a skipped step postpones it by one.
        expected = (steps - opt.num_skipped_steps) / patience
        assert opt.num_reselections >= math.floor(expected) - opt.num_skipped_steps - 1
    else:
        assert opt.num_reselections >= steps // (4 * patience)
    check_flat(model, opt, samples, peaks, limits, warmup=500)


class _Sampler:
    """A Progress that samples memory, objects and hooks of a running TrainingRun."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.training_run: TrainingRun | None = None
        self.samples: list[dict] = []

    def start(self, total: int, initial: int) -> None:
        pass

    def update(self, record: dict) -> None:
        if record["step"] % self.every:
            return
        model = self.training_run.model
        self.samples.append(
            {
                "step": record["step"],
                "rss": current_rss_bytes(),
                "objects": python_objects(),
                "hooks": hook_count(model.parameters()),
                "owners": live_owner_entries(),
                "peak_grads_mb": record["peak_grads_mb"],
                "peak_optimizer_state_mb": record["peak_optimizer_state_mb"],
                "num_reselections": record["num_reselections"],
            }
        )

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_trainer_soak_2000_steps(tmp_path, cache_dir):
    """The CLI's loop for 2,000 steps, reselecting every other step, saving and evaluating."""
    steps = 2000
    config = tiny_config(max_steps=steps, trigger="interval", patience=1, eval_every=500,
                         save_every=250, tensorboard=True)  # fmt: skip
    sampler = _Sampler(every=100)
    training_run = TrainingRun(config, tmp_path, cache_dir=cache_dir, progress=sampler)
    sampler.training_run = training_run
    training_run.run()
    COUNTS["steps soaked"] += steps
    COUNTS["reselections soaked"] += training_run.optimizer.num_reselections
    assert training_run.optimizer.num_reselections >= steps - 1
    samples = sampler.samples
    opt = training_run.optimizer
    assert {s["hooks"] for s in samples} == {opt.num_candidates}
    assert max(s["owners"] for s in samples) <= samples[0]["owners"]
    limits = bounds(opt, training_run.model, torch.float32)
    # Peaks are running maxima: flat means they stop moving once every kind of selection occurred.
    assert samples[-1]["peak_optimizer_state_mb"] * 1e6 <= limits["optimizer_state"]
    assert samples[-1]["peak_grads_mb"] * 1e6 <= limits["grads"]
    settled = [s for s in samples if s["step"] > 400]
    objects = [s["objects"] for s in settled]
    assert max(objects) - objects[0] < OBJECT_SLACK, objects
    rss = [s["rss"] for s in settled]
    if rss[0] is not None:
        assert max(rss) - rss[0] < RSS_SLACK_BYTES, [r // 2**20 for r in rss]
