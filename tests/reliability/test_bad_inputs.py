"""Bad inputs, property-based: random arguments and random small models.

For every combination hypothesis draws (sparsity, patience, lr, betas, eps, weight decay, trigger,
selection, include/exclude, how params are passed, how ``step()`` is fed) on a random model (random
shapes, 0-d and zero-size tensors, fp32/fp64/bf16/fp16/complex64, non-contiguous tensors, tied
weights, frozen tensors, tensors that never or only sometimes get a gradient), ``BlockLLM(...)``
either raises a ``ValueError``/``TypeError`` with a message that says what is wrong (and leaves
the model as it was), or trains for a few steps keeping every invariant:

* at most ``budget = floor((1 - sparsity) * N)`` coordinates change per step;
* unselected tensors, unselected coordinates, frozen and excluded tensors, and tensors without a
  gradient this step are bitwise unchanged; frozen and excluded tensors stay frozen;
* optimizer state exists only for selected tensors and stays within the budget's bytes;
* outside a selection step exactly the selected candidates require grad;
* parameters stay finite when the hyperparameters are.

The same holds one level up: a ``RunConfig`` either refuses a value with ``Invalid <field>`` or
builds an optimizer from it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from blockllm import BlockLLM
from blockllm.app.methods import get_optimizer_spec
from blockllm.app.training import RunConfig
from blockllm.app.training.run_errors import ConfigError
from tests.reliability.helpers import COUNTS, tiny_llama

NAN, INF = float("nan"), float("inf")
# complex64: refused at construction when trainable, left alone when frozen or excluded.
DTYPES = [torch.float32] * 3 + [torch.float64, torch.bfloat16, torch.float16, torch.complex64]
ROLES = ["used", "used", "used", "sometimes", "unused", "frozen"]
# A construction error may say what is wrong in one of these ways; anything else is unclear.
CLEAR = re.compile(r"Invalid|BlockLLM|param|names?|regex|sparsity|budget|candidate")


# ---------------------------------------------------------------------- strategies


@st.composite
def tensor_specs(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(DTYPES)),
        "role": draw(st.sampled_from(ROLES)),
        "noncontiguous": ndim >= 2 and draw(st.booleans()),
    }


@st.composite
def model_specs(draw):
    tensors = draw(st.lists(tensor_specs(), min_size=1, max_size=7))
    aliases = draw(st.lists(st.integers(0, len(tensors) - 1), max_size=2))
    return {"tensors": tensors, "aliases": aliases, "seed": draw(st.integers(0, 3))}


def _maybe_tensor(strategy):
    return st.one_of(strategy, strategy.map(lambda value: torch.tensor(value)))


def _names(spec):
    return [f"p{i}" for i in range(len(spec["tensors"]))] + [
        f"sub.alias{j}" for j in range(len(spec["aliases"]))
    ]


def _valid(spec):
    """Arguments a careful user would pass (edge values included)."""
    names = _names(spec)
    floats = st.floats
    patterns = st.one_of(
        st.none(),
        st.sampled_from(["p0", "p[0-2]", r"sub\..*"]),
        st.lists(st.sampled_from([*names, ".weight"]), max_size=2),
    )
    return {
        "lr": st.one_of(_maybe_tensor(floats(1e-5, 0.1)), st.just(0.0)),
        "betas": st.one_of(st.tuples(floats(0.0, 0.999), floats(0.0, 0.9999)),
                           st.just([0.9, 0.999])),
        "eps": floats(0.0, 1e-3),
        "weight_decay": floats(0.0, 0.5),
        "sparsity": st.one_of(_maybe_tensor(floats(0.0, 0.8)), st.just(0.0)),
        "patience": st.integers(1, 6),
        "trigger": st.sampled_from(["loss", "interval"]),
        "selection": st.sampled_from(["tensor", "mask"]),
        "score": st.sampled_from(["grad_norm", "random"]),
        "visit_penalty": st.booleans(),
        "include": patterns,
        "exclude": patterns,
        "foreach": st.sampled_from([None, True, False]),
        "fused": st.sampled_from([None, False]),
    }  # fmt: skip


# What typos and misreadings produce: wrong types, out-of-range and non-finite values, patterns
# that match nothing or everything, malformed regexes.
_WILD = {
    "lr": st.one_of(st.floats(-1.0, -1e-12), st.sampled_from([NAN, INF, "1e-3", None])),
    "betas": st.one_of(st.tuples(st.floats(-1.0, 2.0), st.floats(-1.0, 2.0)),
                       st.sampled_from([(0.9,), (0.9, 0.99, 0.999), "0.9,0.99", None, (NAN, 0.9),
                                        (0.9, 1.0), 0.9])),
    "eps": st.one_of(st.floats(-1.0, -1e-12), st.sampled_from([NAN, INF, "1e-8"])),
    "weight_decay": st.one_of(st.floats(-1.0, -1e-9), st.sampled_from([NAN, INF])),
    "sparsity": st.one_of(st.floats(-0.5, 1.5), st.sampled_from(
        [0.999999, 1.0, NAN, INF, "0.5", None, True, torch.tensor([0.5, 0.5])])),
    "patience": st.one_of(st.integers(-2, 0), st.sampled_from([2.5, "3", True, None, 10**9])),
    "trigger": st.sampled_from(["plateau", None, "Loss", ""]),
    "selection": st.sampled_from(["coordinate", 1, None]),
    "score": st.sampled_from(["norm", None]),
    "visit_penalty": st.sampled_from(["yes", 1, None]),
    "include": st.sampled_from(["(", "[", "nothing.here", "", ["missing"], [1], [""], 123,
                                b"p0", ".*"]),
    "exclude": st.sampled_from(["(", "nothing.here", ".*", ["missing"], [1], [""], 123, "p.*"]),
    "foreach": st.sampled_from(["yes", 1]),
    "fused": st.sampled_from(["no", 0, True]),
}  # fmt: skip


@st.composite
def arguments(draw, spec):
    """Mostly valid arguments with up to two wild ones, so both outcomes are common."""
    valid = _valid(spec)
    # The default sparsity 0.9 leaves no budget on most tiny models: always choose one.
    chosen = draw(st.fixed_dictionaries({"sparsity": valid.pop("sparsity")}, optional=valid))
    for name in draw(st.lists(st.sampled_from(sorted(_WILD)), max_size=2, unique=True)):
        chosen[name] = draw(_WILD[name])
    # The frozen rule: the checks below pin that only the selection moves. (Rest rules have
    # their own tests in tests/optim/test_rest.py.)
    chosen["rest"] = "none"
    return chosen


# ---------------------------------------------------------------------- models


def build_model(spec):
    generator = torch.Generator().manual_seed(spec["seed"])
    model = nn.Module()
    model.sub = nn.Module()
    weights = []
    for index, tensor in enumerate(spec["tensors"]):
        data = torch.randn(tensor["shape"], generator=generator)
        if tensor["noncontiguous"]:
            data = data.transpose(0, 1).contiguous().transpose(0, 1)  # same shape, other strides
        param = nn.Parameter(data.to(tensor["dtype"]), requires_grad=tensor["role"] != "frozen")
        setattr(model, f"p{index}", param)
        weights.append(torch.rand(tensor["shape"], generator=generator) + 0.5)
    for number, target in enumerate(spec["aliases"]):
        setattr(model.sub, f"alias{number}", getattr(model, f"p{target}"))  # tied weights
    return model, weights


def loss_of(model, spec, weights, step):
    total = torch.zeros(())
    for index, tensor in enumerate(spec["tensors"]):
        role = tensor["role"]
        if role == "unused" or (role == "sometimes" and (step + index) % 3):
            continue
        param = getattr(model, f"p{index}")
        value = param.abs() if param.is_complex() else param
        total = total + torch.tanh(value.float() * weights[index] - 0.3).pow(2).sum()
    return total


def params_argument(model, style):
    if style == "named":
        return model.named_parameters()
    if style == "named-with-aliases":
        return model.named_parameters(remove_duplicate=False)
    if style == "groups":
        named = list(model.named_parameters())
        half = max(1, len(named) // 2)
        groups = [{"params": [p for _, p in named[:half]], "names": [n for n, _ in named[:half]]}]
        if named[half:]:
            groups.append({"params": named[half:], "lr": 1e-2})  # (name, tensor) pairs
        return groups
    if style == "unnamed":
        return model.parameters()
    if style == "set":
        return set(model.parameters())
    return []  # "empty"


# ---------------------------------------------------------------------- the property


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _expected_budget(sparsity, total):
    return math.floor((1 - Fraction(repr(float(sparsity)))) * total)


def _run_step(opt, model, spec, weights, step, driver):
    """One optimizer step, driven the way ``driver`` names (all public ways to feed the loss)."""

    def backward(index):
        loss = loss_of(model, spec, weights, index)
        if loss.requires_grad:
            loss.backward()
        return loss

    if driver == "closure":
        opt.step(lambda: backward(step))
    elif driver == "record-loss":
        opt.record_loss(backward(step))
        opt.step()
    elif driver == "accumulate":
        losses = [backward(2 * step), backward(2 * step + 1)]
        opt.step(loss=float(sum(loss.item() for loss in losses)) / 2)
    elif driver == "loss-float":
        opt.step(loss=backward(step).item())
    else:
        opt.step(loss=backward(step))


def check_random_construction_and_training(spec, kwargs, style, steps, driver="loss-tensor"):
    model, weights = build_model(spec)
    named = dict(model.named_parameters(remove_duplicate=False))
    trainable_before = {name: p.requires_grad for name, p in named.items()}
    values_before = {name: p.detach().clone() for name, p in named.items()}
    COUNTS["bad inputs tried"] += 1
    try:
        opt = BlockLLM(params_argument(model, style), **kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert CLEAR.search(message), f"unclear error for {kwargs}: {message!r}"
        assert all(torch.equal(values_before[n], p.detach()) for n, p in named.items())
        # A refused construction leaves the model exactly as it was (nothing frozen), so the
        # corrected call sees the same trainable tensors.
        assert all(trainable_before[n] == p.requires_grad for n, p in named.items()), message
        COUNTS["bad inputs rejected at construction"] += 1
        return

    COUNTS["bad inputs trained"] += 1
    candidates = opt.candidate_names
    frozen = [n for n in named if not trainable_before[n]]
    # trainable before, yet no candidate is this tensor: excluded by include/exclude
    excluded = [
        n
        for n in named
        if trainable_before[n] and all(named[n] is not named[c] for c in candidates)
    ]
    assert not set(frozen) & set(candidates)
    total = sum(named[name].numel() for name in candidates)
    assert opt.num_coordinates == total
    assert opt.budget == _expected_budget(kwargs.get("sparsity", 0.9), total) >= 1
    hyper_finite = all(_finite(kwargs.get(k, 1.0)) for k in ("lr", "eps", "weight_decay"))
    # per selected coordinate: two moments (fp32, or fp64 for fp64 tensors), an fp32 master
    # (low precision) and an int32 coordinate; a step scalar per tensor
    moment = max(8 if named[name].dtype == torch.float64 else 4 for name in candidates)
    state_bound = opt.budget * (2 * moment + 4 + 4) + 8 * len(candidates)

    for step in range(steps):
        before = {name: p.detach().clone() for name, p in named.items()}
        _run_step(opt, model, spec, weights, step, driver)
        # Gradients live until zero_grad: a selected tensor has one exactly when it was used (a
        # partly selected tensor's, compacted to its selected coordinates, outside .grad).
        held = opt.compact_gradients.held
        had_grad = {
            name: named[name].grad is not None or index in held
            for index, name in enumerate(candidates)
        }
        selected = set(opt.selected)
        assert selected <= set(candidates)
        assert opt.num_selected <= opt.budget
        for name in candidates:
            param = named[name]
            changed = _changed(before[name], param.detach())
            if name not in selected or not had_grad[name]:
                assert not changed.any(), f"step {step}: unselected or gradient-less {name} changed"
                continue
            coordinates = opt.coordinates(name)
            if coordinates is not None:
                outside = torch.ones(param.numel(), dtype=torch.bool)
                outside[coordinates.long()] = False
                assert not changed.reshape(-1)[outside].any(), f"unselected coordinates of {name}"
        for name in frozen + excluded:
            assert torch.equal(_bits(values_before[name]), _bits(named[name].detach())), name
            assert not named[name].requires_grad, name
        selected_tensors = {id(named[name]) for name in selected}
        assert all(id(p) in selected_tensors for p, s in opt.state.items() if s)
        assert opt.memory_report()["optimizer_state"] <= state_bound
        if not opt.selection_pending:
            for name in candidates:
                assert named[name].requires_grad == (name in selected), name
        if hyper_finite:
            assert all(torch.isfinite(p).all() for p in named.values() if p.is_floating_point())
        opt.zero_grad(set_to_none=True)
    COUNTS["steps on random inputs"] += steps


def _bits(tensor):
    return tensor.reshape(-1).contiguous().view(torch.uint8) if tensor.numel() else tensor


def _changed(old, new):
    if old.numel() == 0:
        return torch.zeros(old.shape, dtype=torch.bool)
    return (
        _bits(old)
        .view(-1, old.element_size())
        .ne(_bits(new).view(-1, new.element_size()))
        .any(dim=1)
        .reshape(old.shape)
    )


DRIVERS = ["loss-tensor", "loss-float", "closure", "record-loss", "accumulate"]
STYLES = ["named"] * 4 + ["named-with-aliases", "groups", "groups", "unnamed", "set", "empty"]


@st.composite
def cases(draw):
    spec = draw(model_specs())
    driver = draw(st.sampled_from(DRIVERS))
    return (
        spec,
        draw(arguments(spec)),
        draw(st.sampled_from(STYLES)),
        draw(st.integers(2, 10)),
        driver,
    )


_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@settings(max_examples=80, **_SETTINGS)
@given(case=cases())
def test_random_arguments_and_models_fail_clearly_or_train_within_the_budget(case):
    torch.set_num_threads(1)
    check_random_construction_and_training(*case)


@pytest.mark.slow
@settings(max_examples=5000, **_SETTINGS)
@given(case=cases())
def test_random_arguments_and_models_many(case):
    torch.set_num_threads(1)
    check_random_construction_and_training(*case)


# ---------------------------------------------------------------------- one level up: RunConfig


@st.composite
def config_overrides(draw):
    floats = st.floats(allow_nan=True, allow_infinity=True)
    optional = {
        "lr": st.one_of(st.floats(1e-5, 1e-1), floats, st.sampled_from(["1e-3", None])),
        "beta1": st.one_of(st.floats(0.0, 0.99), floats),
        "beta2": st.one_of(st.floats(0.0, 0.9999), floats),
        "eps": st.one_of(st.floats(0.0, 1e-3), floats),
        "weight_decay": st.one_of(st.floats(0.0, 0.5), floats),
        "sparsity": st.one_of(st.floats(0.0, 0.99), floats, st.just(True)),
        "patience": st.one_of(st.integers(-2, 50), st.sampled_from([2.5, "3", True])),
        "trigger": st.sampled_from(["loss", "interval", "Loss", ""]),
        "selection": st.sampled_from(["tensor", "mask", "tensors"]),
        "exclude": st.sampled_from([None, "", r".*embed_tokens\.weight", "(", "lm_head.*", ".*",
                                    "model.norm.weight", "no_such_tensor", 5]),
        "grad_clip": st.one_of(st.floats(0.0, 5.0), floats),
        "max_steps": st.one_of(st.integers(-1, 10), st.just(3.0)),
        "save_every": st.integers(-1, 5),
        "keep_checkpoints": st.integers(-1, 3),
        "log_every": st.integers(-1, 3),
        "warmup_steps": st.integers(-3, 5),
        "optimizer": st.sampled_from(["blockllm", "adamw", "adam"]),
    }  # fmt: skip
    return draw(st.fixed_dictionaries({}, optional=optional))


def check_config(overrides):
    COUNTS["bad inputs tried"] += 1
    try:
        config = RunConfig.create("pretrain", "tiny", **overrides)
    except (ConfigError, TypeError) as exc:
        assert str(exc).startswith(("Invalid ", "Unknown config keys")), str(exc)
        COUNTS["bad inputs rejected at construction"] += 1
        return
    assert RunConfig.from_dict(config.to_dict()) == config
    model = tiny_llama()
    try:
        get_optimizer_spec(config.optimizer).build(model, config)
    except ValueError as exc:
        # Only what a config cannot know without the model: the parameter names and sizes.
        assert config.exclude is not None or config.sparsity > 0.99, str(exc)
        assert re.search(r"matches no parameter|no candidate tensors|budget of 0", str(exc))
        COUNTS["bad inputs rejected at construction"] += 1
        return
    COUNTS["bad inputs trained"] += 1


@settings(max_examples=40, **_SETTINGS)
@given(overrides=config_overrides())
def test_random_run_configs_are_refused_by_name_or_build_their_optimizer(overrides):
    torch.set_num_threads(1)
    check_config(overrides)


@pytest.mark.slow
@settings(max_examples=600, **_SETTINGS)
@given(overrides=config_overrides())
def test_random_run_configs_many(overrides):
    torch.set_num_threads(1)
    check_config(overrides)


def test_the_strategies_reach_both_outcomes():
    """Guard against a property that only ever exercises one branch."""
    before = COUNTS.copy()
    test_random_arguments_and_models_fail_clearly_or_train_within_the_budget()
    rejected = (
        COUNTS["bad inputs rejected at construction"]
        - before["bad inputs rejected at construction"]
    )
    trained = COUNTS["bad inputs trained"] - before["bad inputs trained"]
    assert rejected >= 10 and trained >= 10, (rejected, trained)
