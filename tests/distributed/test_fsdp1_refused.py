"""FSDP1 (FullyShardedDataParallel) parameters are refused: each rank would select its own."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from blockllm import BlockLLM


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_parameters_are_refused_with_the_fix(tmp_path, use_orig_params):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
            device_id=torch.device("cpu"),
            use_orig_params=use_orig_params,
        )
        with pytest.raises(ValueError, match=r"FSDP1 \(FullyShardedDataParallel\).*fully_shard"):
            BlockLLM(model.named_parameters(), lr=1e-3)
    finally:
        dist.destroy_process_group()


def test_names_that_only_contain_the_wrappers_words_are_not_mistaken_for_fsdp1():
    model = nn.Sequential()
    model.add_module("_fsdp_wrapped_module_like", nn.Linear(4, 4))  # not the exact segment
    model.register_parameter("proj_flat_param", nn.Parameter(torch.zeros(3)))
    BlockLLM(model.named_parameters(), lr=1e-3)
