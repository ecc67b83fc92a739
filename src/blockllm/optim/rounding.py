"""Stochastic rounding of fp32 values to bf16: small steps survive on average.

A weight stored in bf16 keeps 8 bits of mantissa: a step smaller than half its last place
(``|w| * 2**-9``) rounds away to nothing under round-to-nearest, and a state-free update of
``lr * sign(g)`` at a decayed learning rate is exactly such a step for most weights. Rounding
up or down at random, with the probability of the distance to the other neighbour, makes the
stored value equal the fp32 one in expectation, with no extra state (the approach of torchao's
low-bit optimizers). The randomness comes from a seeded generator whose state the optimizer
checkpoints, so a resumed run rounds exactly as the uninterrupted one.
"""

from __future__ import annotations

import torch

_LOW_HALF = 0xFFFF


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``value`` (fp32) rounded to bf16 at random, in proportion to the distance to each side.

    bf16 is the upper half of an fp32's bits. Adding a uniform random 16-bit number to the lower
    half and truncating it carries into the upper half with exactly the probability of rounding
    up (in magnitude, so the same holds for negative values). Infinities and NaN pass through.
    """
    bits = value.view(torch.int32)
    noise = torch.randint(
        0, _LOW_HALF + 1, value.shape, dtype=torch.int32, device=value.device, generator=generator
    )
    rounded = (bits + noise) & ~_LOW_HALF
    finite = torch.isfinite(value)
    return torch.where(finite, rounded.view(torch.float32), value).to(torch.bfloat16)


class RoundingGenerators:
    """One seeded generator per device for stochastic rounding, checkpointed with the optimizer
    so that a resumed run draws the same numbers as the uninterrupted one."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}

    def for_tensor(self, tensor: torch.Tensor) -> torch.Generator:
        generator = self.generators.get(str(tensor.device))
        if generator is None:
            generator = torch.Generator(device=tensor.device).manual_seed(self.seed)
            self.generators[str(tensor.device)] = generator
        return generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {device: generator.get_state() for device, generator in self.generators.items()}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        for device, state in saved.items():
            generator = torch.Generator(device=device)
            generator.set_state(state.cpu() if device == "cpu" else state)
            self.generators[device] = generator


__all__ = ["RoundingGenerators", "stochastic_round_to_bf16"]
