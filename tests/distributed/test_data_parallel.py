"""BlockLLM(process_group=...) on 2 CPU processes (gloo): identical replicas and selections."""

import functools

import pytest
import torch

from tests.distributed.spawn import run_workers
from tests.distributed.workers import STEPS, data_parallel_worker, single_process_reference

pytestmark = pytest.mark.distributed


# With a state-free rule for the rest every gradient is averaged (in the hooks, as it lands).
OPTIONS = [{}, {"rest": "sign"}, {"rest": "colnorm", "compact_grads": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=["frozen-rest", "sign", "colnorm"])
def test_two_ranks_stay_identical_and_match_one_process_on_the_whole_batch(tmp_path, options):
    run_workers(functools.partial(data_parallel_worker, options=options), tmp_path)

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # replicas are bitwise identical after steps that cross reselections
    assert rank0["reselections"] == rank1["reselections"] == (STEPS - 1) // 3
    assert rank0["history"] == rank1["history"]
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name

    # and they match one process on the concatenated batch
    reference = single_process_reference(options)
    assert reference["history"] == rank0["history"]
    for name, value in reference["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert rank0["bytes"] > 0


@pytest.mark.parametrize("rest", ["colnorm", "sign"])
def test_two_ranks_clip_against_the_whole_batchs_gradient_norm_at_every_step(tmp_path, rest):
    # The norm is assembled from the rest's norms taken in the hooks (after averaging) and the
    # held block's; at every step, selection steps included, it must be the whole batch's.
    from tests.distributed.workers import clip_norm_worker

    run_workers(functools.partial(clip_norm_worker, rest=rest), tmp_path)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["reselections"] >= 4
        assert saved["ratios"] == pytest.approx([1.0] * 10, abs=1e-5)


def test_a_ddp_wrapped_model_without_process_group_is_refused(tmp_path):
    from tests.distributed.workers import ddp_detection_worker

    run_workers(ddp_detection_worker, tmp_path)
    for rank in (0, 1):
        outcome = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        assert outcome["plain"].startswith("Invalid params: they look like a DistributedDataParallel")
        assert "process_group=torch.distributed.group.WORLD" in outcome["plain"]
        assert outcome["with_group"] == "accepted"
