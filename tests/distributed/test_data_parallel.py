"""BlockLLM(process_group=...) on 2 CPU processes (gloo): identical replicas and selections."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.workers import STEPS, data_parallel_worker, single_process_reference

pytestmark = pytest.mark.distributed


def test_two_ranks_stay_identical_and_match_one_process_on_the_whole_batch(tmp_path):
    store = tmp_path / "store"
    context = mp.start_processes(
        data_parallel_worker, args=(2, str(store), str(tmp_path)), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    for _ in range(120):  # bounded: 120 s at most
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the distributed workers did not finish within 120 s")

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # replicas are bitwise identical after steps that cross reselections
    assert rank0["reselections"] == rank1["reselections"] == (STEPS - 1) // 3
    assert rank0["history"] == rank1["history"]
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name

    # and they match one process on the concatenated batch
    reference = single_process_reference()
    assert reference["history"] == rank0["history"]
    for name, value in reference["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert rank0["bytes"] > 0
