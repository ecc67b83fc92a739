"""``--fit``: the largest micro-batch within a budget is the largest, by the estimate's own totals."""

import dataclasses

import pytest

from blockllm.app.planning import EstimateSettings, batch_fit, estimate_memory
from blockllm.app.planning.batch_fit import largest_batch, largest_batches


def total(shape, settings, method, batch):
    step = dataclasses.replace(settings, batch_size=batch)
    plan = estimate_memory(shape, step, [method])
    return plan.total(plan.rows[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["adamw", "blockllm", "galore"])
def test_the_largest_batch_fits_and_one_more_does_not(shape, precision, checkpointing, method):
    settings = EstimateSettings(batch_size=1, seq_len=64, precision=precision,
                                gradient_checkpointing=checkpointing)  # fmt: skip
    budget = total(shape, settings, method, 37) + 1000  # between batch 37 and 38, or beyond
    found = largest_batch(shape, settings, method, budget)
    assert total(shape, settings, method, found) <= budget < total(shape, settings, method, found + 1)
    assert found >= 37


def test_nothing_fits_and_everything_fits(shape, monkeypatch):
    settings = EstimateSettings(batch_size=1, seq_len=64)
    weights_alone = shape.num_parameters * 4
    assert largest_batches(shape, settings, ["adamw", "blockllm"], weights_alone) == {"adamw": 0, "blockllm": 0}
    monkeypatch.setattr(batch_fit, "MAX_BATCH", 64)
    assert largest_batch(shape, settings, "blockllm", 10**15) == 64
    with pytest.raises(ValueError, match=r"Invalid fit: 0 bytes \(must be > 0\)"):
        largest_batches(shape, settings, ["adamw"], 0)
