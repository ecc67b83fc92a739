"""Small models and loops shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """An MLP with an embedding and a head: blocks of very different sizes and depths."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 3, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens).mean(dim=1)
        for layer in self.layers:
            hidden = hidden + torch.tanh(layer(hidden))
        return self.head(self.norm(hidden))


def make_batches(count: int, batch: int = 16, vocab: int = 32, seq: int = 6, classes: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
        labels = tokens[:, 0] % classes  # learnable: the first token decides the class
        data.append((tokens, labels))
    return data


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    tokens, labels = batch
    return nn.functional.cross_entropy(model(tokens), labels)


def train_steps(model, optimizer, batches, *, scheduler=None, pass_loss=True):
    from blockllm import BlockLLM

    pass_loss = pass_loss and isinstance(optimizer, BlockLLM)
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        if pass_loss:
            optimizer.step(loss=loss)
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def expected_state_bytes(optimizer) -> int:
    """What the optimizer must hold as state, derived from its selection (fp32 parameters).

    Per updated coordinate two fp32 moments (8 bytes), per tensor with state a 4-byte step
    counter, and the coordinate lists of partly selected tensors (row ids and leftover
    coordinates, or one int32 per coordinate): exact whatever the selection is, so a bound built
    on it does not depend on which tensors a machine's rounding happens to select.
    """
    from blockllm.selection.coordinates import index_bytes

    total = 0
    for _, param in optimizer.named_candidates():
        if not optimizer.state.get(param):
            continue
        coordinates = optimizer.selector.selection[optimizer.candidate_index(param)]
        count = param.numel() if coordinates is None else coordinates.numel()
        total += 8 * count + 4
        if coordinates is not None:
            total += index_bytes(coordinates)
    return total + rest_rule_bytes(optimizer)


def rest_rule_bytes(optimizer) -> int:
    """What a factored rest rule (``vocab_rest`` "auto" = "factored") must hold: fp32 row and
    column means per matrix it has stepped, a full fp32 vector per vector, and a step count."""
    params = dict(optimizer.named_candidates())
    total = 0
    for name in optimizer.state_dict()["blockllm"].get("rest", {}).get("rule", {}):
        shape = params[name].shape
        held = shape[-1] + params[name].numel() // shape[-1] if len(shape) >= 2 else shape.numel()
        total += 4 * held + 4
    return total
