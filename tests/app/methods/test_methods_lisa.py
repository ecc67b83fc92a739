"""LISA: random layers trainable every K steps; frozen layers hold neither gradients nor state."""

import io

import torch
from torch import nn

from blockllm.app.methods.lisa import LISA


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _train(model, optimizer, steps):
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _layer(name):
    return name.split(".")[0] + "." + name.split(".")[1] if name.startswith("layers.") else None


def test_frozen_layers_hold_no_state_and_do_not_change():
    model = Stack()
    optimizer = LISA(model.named_parameters(), num_active=1, interval=3, seed=0, lr=1e-2)
    first = list(optimizer.active)
    assert len(first) == 1
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        layer = _layer(name)
        if layer is not None and layer not in first:
            assert not param.requires_grad and param.grad is None
            assert param not in optimizer.state
            assert torch.equal(param, before[name])
        else:
            assert param in optimizer.state and not torch.equal(param, before[name])
    optimizer.zero_grad(set_to_none=True)
    _train(model, optimizer, 8)
    assert optimizer.num_reselections == 3
    # After every switch only the active layer and the always-trainable parameters keep state.
    with_state = {name for name, p in model.named_parameters() if p in optimizer.state}
    for name in with_state:
        assert _layer(name) in (None, *optimizer.active)
    always = sum(p.numel() for n, p in model.named_parameters() if _layer(n) is None)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert abs(optimizer.trainable_fraction - (always + layer) / total) < 1e-9


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = Stack()
    optimizer = LISA(model.named_parameters(), num_active=2, interval=2, seed=3, lr=1e-2)
    _train(model, optimizer, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    # Through bytes, as a checkpoint goes (state_dict() shares the live tensors).
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    clone = Stack()
    clone.load_state_dict(saved_model)
    restored = LISA(clone.named_parameters(), num_active=2, interval=2, seed=3, lr=1e-2)
    restored.load_state_dict(saved)
    assert restored.active == optimizer.active
    torch.manual_seed(1)
    _train(model, optimizer, 4)
    torch.manual_seed(1)
    _train(clone, restored, 4)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b)
