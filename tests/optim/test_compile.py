"""torch.compile'd models train under BlockLLM as eager ones do (the gradient hooks still fire).

``backend="aot_eager"`` runs TorchDynamo and AOTAutograd, the parts that decide which gradients
exist and when the hooks run, without needing a C++ compiler for inductor's kernels.
"""

import pytest
import torch
from torch import nn

from blockllm import BlockLLM

dynamo = pytest.importorskip("torch._dynamo")


def _model():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    return nn.Sequential(nn.Embedding(50, 32), *layers, nn.Linear(32, 50))


def _train(compiled: bool, **options):
    model = _model()
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, trigger="interval",
                   patience=3, **options)  # fmt: skip
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(12):  # three reselections
        tokens = torch.randint(0, 50, (8, 6), generator=generator)
        logits = forward(tokens)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model, opt


@pytest.mark.parametrize("rest", ["auto", "none"])
def test_a_compiled_model_trains_as_the_eager_one(rest):
    dynamo.reset()
    dynamo.utils.counters.clear()
    eager_losses, eager, eager_opt = _train(False, rest=rest)
    compiled_losses, compiled, compiled_opt = _train(True, rest=rest)
    assert compiled_opt.num_reselections == eager_opt.num_reselections == 3
    assert compiled_opt.selected == eager_opt.selected
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    if rest == "auto":
        # Every weight keeps requires_grad under a rest rule: one graph for the whole run,
        # whatever the selection (rest="none" flips requires_grad, which recompiles).
        assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
