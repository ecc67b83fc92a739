import io
import math

import pytest
import torch

from blockllm.app.training.schedule import WarmupCosine, build_scheduler


def test_warmup_then_cosine_to_ten_percent():
    schedule = WarmupCosine(warmup_steps=10, max_steps=100, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)  # the first update is not wasted at lr 0
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(99) == pytest.approx(0.1)
    middle = 10 + (99 - 10) / 2
    assert schedule(int(middle)) == pytest.approx(0.55, abs=0.02)
    values = [schedule(step) for step in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_and_single_step():
    assert WarmupCosine(0, 1)(0) == 1.0
    assert WarmupCosine(0, 2)(1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 0), "max_steps"),
        ((-1, 10), "warmup_steps"),
        ((11, 10), "warmup_steps"),
        ((0, 10, 1.5), "min_ratio"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosine(*args)


def test_scheduler_drives_lr_and_round_trips_weights_only():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, max_steps=6, min_ratio=0.1)
    lrs = []
    for _ in range(3):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0])
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_scheduler(
        torch.optim.AdamW([param], lr=1.0), warmup_steps=2, max_steps=6, min_ratio=0.1
    )
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    assert not math.isnan(fresh.get_last_lr()[0])
