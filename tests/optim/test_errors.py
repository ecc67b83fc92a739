"""The bad-input table: every invalid argument fails at construction with an exact message."""

import re

import pytest
import torch

from blockllm import BlockLLM, NoMatchingParamsError
from tests.optim.helpers import TinyNet


def named():
    return TinyNet().named_parameters()


CASES = [
    # (kwargs, exception, exact message)
    (dict(sparsity=1.0), ValueError, "Invalid sparsity: 1.0 (must be in [0, 1))"),
    (dict(sparsity=-0.1), ValueError, "Invalid sparsity: -0.1 (must be in [0, 1))"),
    (dict(sparsity="0.9"), TypeError, "Invalid sparsity: expected a number, got str '0.9'"),
    (dict(sparsity=0.9999), ValueError,
     "Invalid sparsity: 0.9999 leaves a budget of 0 of 1445 coordinates; lower the sparsity"),
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    (dict(lr=None), TypeError, "Invalid learning rate: expected a number, got NoneType None"),
    (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0 (must be in [0, 1))"),
    (dict(betas=(0.9, -0.5)), ValueError, "Invalid beta parameter at index 1: -0.5 (must be in [0, 1))"),
    (dict(betas=0.9), TypeError, "Invalid betas: expected a pair (beta1, beta2), got 0.9"),
    (dict(patience=0), ValueError, "Invalid patience: 0 (must be >= 1)"),
    (dict(patience=2.5), TypeError, "Invalid patience: expected an int, got float 2.5"),
    (dict(patience=True), TypeError, "Invalid patience: expected an int, got bool True"),
    (dict(trigger="sometimes"), ValueError, "Invalid trigger: 'sometimes' (choose from 'loss', 'interval')"),
    (dict(selection="rows"), ValueError, "Invalid selection: 'rows' (choose from 'tensor', 'mask')"),
    (dict(score="hessian"), ValueError,
     "Invalid score: 'hessian' (choose from 'grad_norm', 'random', 'cyclic')"),
    (dict(visit_penalty="yes"), TypeError, "Invalid visit_penalty: expected a bool, got 'yes'"),
    (dict(keep_moments=1), TypeError, "Invalid keep_moments: expected a bool, got 1"),
    (dict(max_tensor_share=0.0), ValueError, "Invalid max_tensor_share: 0.0 (must be in (0, 1])"),
    (dict(max_tensor_share=1.5), ValueError, "Invalid max_tensor_share: 1.5 (must be in (0, 1])"),
    (dict(max_tensor_share="half"), TypeError,
     "Invalid max_tensor_share: expected a number, got str 'half'"),
    (dict(partial="columns"), ValueError,
     "Invalid partial: 'columns' (choose from 'coordinates', 'rows')"),
    (dict(moment_dtype="float16"), ValueError,
     "Invalid moment_dtype: 'float16' (choose from 'float32', 'bfloat16')"),
    (dict(moment_dtype=torch.bfloat16), ValueError,
     "Invalid moment_dtype: torch.bfloat16 (choose from 'float32', 'bfloat16')"),
    (dict(master_weights="no"), TypeError, "Invalid master_weights: expected a bool, got 'no'"),
    (dict(rest="adam"), ValueError,
     "Invalid rest: 'adam' (choose from 'none', 'sign', 'colnorm', 'factored', 'auto')"),
    (dict(factored_beta2=1.0), ValueError, "Invalid factored_beta2: 1.0 (must be in [0, 1))"),
    (dict(factored_beta2=-0.5), ValueError, "Invalid factored_beta2: -0.5 (must be in [0, 1))"),
    (dict(factored_beta2="0.99"), TypeError,
     "Invalid factored_beta2: expected a number, got str '0.99'"),
    (dict(entry_warmup=-1), ValueError, "Invalid entry_warmup: -1 (must be >= 0)"),
    (dict(entry_warmup=2.0), TypeError, "Invalid entry_warmup: expected an int, got float 2.0"),
    (dict(foreach=True, fused=True), ValueError,
     "Invalid foreach=True with fused=True: they cannot both be True"),
    (dict(exclude=["nonexistent"]), NoMatchingParamsError,
     "Invalid exclude: 'nonexistent' matches no parameter name (names look like "
     "'embed.weight', 'layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias')"),
    (dict(include=r"decoder\..*"), NoMatchingParamsError,
     "Invalid include: regex 'decoder\\\\..*' matches no parameter name (names look like "
     "'embed.weight', 'layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias')"),
    (dict(include="(unclosed"), ValueError,
     "Invalid include: '(unclosed' is not a valid regex (missing ), unterminated subpattern at position 0)"),
    (dict(exclude=3), TypeError, "Invalid exclude: expected a regex str or a list of names, got int"),
    (dict(exclude=r".*"), ValueError,
     "BlockLLM has no candidate tensors: every parameter is frozen or excluded (exclude='.*', include=None)"),
]


@pytest.mark.parametrize("kwargs, error, message", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        BlockLLM(named(), **kwargs)


PARAM_CASES = [
    ([], ValueError, "BlockLLM got an empty parameter list (params=[])"),
    (lambda: list(TinyNet().parameters()), TypeError,
     "BlockLLM needs parameter names: pass model.named_parameters() or param groups with a "
     "'names' key, got unnamed tensors"),
    (lambda: torch.nn.Parameter(torch.ones(2)), TypeError,
     "BlockLLM needs parameter names: pass model.named_parameters() or param groups with a "
     "'names' key, got a single Parameter"),
    (lambda: [{"params": [torch.nn.Parameter(torch.ones(2))], "names": ["a", "b"]}], ValueError,
     "Invalid param group: 2 names for 1 tensors"),
    (lambda: [("a", torch.nn.Parameter(torch.ones(2))), ("a", torch.nn.Parameter(torch.ones(2)))],
     ValueError, "Invalid params: the name 'a' is given to two different tensors"),
    (lambda: {("a", torch.nn.Parameter(torch.ones(2)))}, TypeError,
     "params must be an ordered collection (a set changes order between runs), got a set"),
    (lambda: [("a", 3.0)], TypeError, "parameter 'a' is a float, not a Tensor"),
]


@pytest.mark.parametrize("params, error, message", PARAM_CASES, ids=[c[2][:40] for c in PARAM_CASES])
def test_bad_params_fail_at_construction(params, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        BlockLLM(params() if callable(params) else params)


def test_bad_loss_values_are_reported_with_the_argument_name():
    model = TinyNet()
    opt = BlockLLM(model.named_parameters())
    with pytest.raises(ValueError, match=r"^Invalid loss: expected a scalar, got a tensor of shape \(2,\)$"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="^Invalid loss: expected a float or a scalar tensor, got str$"):
        opt.step(loss="low")
