"""Start gloo worker processes for a test and fail it, killing them, when they overrun."""

import pytest
import torch.multiprocessing as mp


def run_workers(worker, out_dir, store_name="store", seconds=120, nprocs=2):
    """Run ``worker(rank, nprocs, store_path, out_dir)`` in ``nprocs`` spawned processes."""
    context = mp.start_processes(
        worker, args=(nprocs, str(out_dir / store_name), str(out_dir)), nprocs=nprocs,
        join=False, start_method="spawn",
    )  # fmt: skip
    for _ in range(seconds):
        if context.join(timeout=1):
            return
    for process in context.processes:
        process.kill()
    pytest.fail(f"the distributed workers did not finish within {seconds} s")
