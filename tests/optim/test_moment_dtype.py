"""``moment_dtype="bfloat16"``: Adam's moments of the block stored in bf16, rounded stochastically."""

import pytest
import torch

from blockllm import BlockLLM
from tests.optim.helpers import TinyNet, expected_state_bytes, make_batches, train_steps
from tests.optim.test_state import assert_same_weights, one_step, resume, train_both


def _moments(opt):
    return [
        value for state in opt.state.values() for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    ]  # fmt: skip


def test_bf16_moments_take_half_the_bytes_of_the_same_selection():
    reports = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = TinyNet(width=24)
        opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, rest="none",
                       moment_dtype=dtype)  # fmt: skip
        train_steps(model, opt, make_batches(3))
        assert {m.dtype for m in _moments(opt)} == {getattr(torch, dtype)}
        moments = sum(m.numel() * m.element_size() for m in _moments(opt))
        reports[dtype] = (
            moments,
            opt.memory_report()["optimizer_state"],
            expected_state_bytes(opt),
        )
    fp32, bf16 = reports["float32"], reports["bfloat16"]
    assert fp32[1] == fp32[2]  # the helper's count is exact for fp32 moments
    assert bf16[0] * 2 == fp32[0]
    assert bf16[1] == fp32[1] - bf16[0]  # only the moments shrank


def test_bf16_moments_follow_adamw_closely_with_every_tensor_selected():
    torch.manual_seed(0)
    reference, model = TinyNet(width=24), TinyNet(width=24)
    model.load_state_dict(reference.state_dict())
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, weight_decay=0.01, sparsity=0.0,
                   moment_dtype="bfloat16")  # fmt: skip
    start = [p.detach().clone() for p in reference.parameters()]
    batches = make_batches(30)
    train_steps(reference, adamw, batches, pass_loss=False)
    train_steps(model, opt, batches)
    for before, a, b in zip(start, reference.parameters(), model.parameters()):
        moved = (a - before).abs().max()
        assert moved > 0
        # bf16 moments carry 8 bits: the paths may part by a few % of the distance travelled.
        assert (a - b).abs().max() <= 0.05 * moved


def test_stochastic_rounding_keeps_the_second_moment_moving():
    # A constant gradient of 1: v = 1 - 0.999**t in exact arithmetic. Past v = 0.5 its step
    # (0.001 * (1 - v)) is below half a bf16 unit, so round-to-nearest would stop it near 0.5.
    weight = torch.nn.Parameter(torch.zeros(4096))
    opt = BlockLLM([("w", weight)], lr=1e-6, sparsity=0.0, moment_dtype="bfloat16")
    steps = 1500
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        opt.step()
    v = opt.state[weight]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    exact = 1 - 0.999**steps
    assert abs(v.float().mean().item() - exact) < 0.005
    nearest = torch.tensor(0.0, dtype=torch.bfloat16)
    for _ in range(steps):
        nearest = (nearest.float() * 0.999 + 0.001).to(torch.bfloat16)
    assert exact - nearest.item() > 0.1  # what the test guards against


@pytest.mark.parametrize("rest", ["none", "sign"])
def test_resume_with_bf16_moments_is_bit_for_bit_across_a_reselection(rest):
    torch.manual_seed(0)
    model = TinyNet(width=24)
    kwargs = dict(lr=1e-2, sparsity=0.8, patience=4, trigger="interval", rest=rest,
                  moment_dtype="bfloat16")  # fmt: skip
    opt = BlockLLM(model.named_parameters(), **kwargs)
    batches = make_batches(24)
    for batch in batches[:7]:
        one_step(model, opt, batch)
    clone, resumed, _ = resume(model, opt, lambda: TinyNet(width=24), **kwargs)
    assert {m.dtype for m in _moments(resumed)} == {torch.bfloat16}
    train_both([(model, opt), (clone, resumed)], batches[7:])
    assert opt.num_reselections >= 3
    assert_same_weights(model, clone)
