"""Leaving a gloo process group in step with the other ranks."""

import torch.distributed as dist


def leave_together() -> None:
    """Wait until every rank has finished its work before the group is destroyed.

    A rank that destroys its gloo group and exits while a peer is still inside a collective makes
    the peer's gloo threads die mid-transfer, which aborts that process ("terminate called without
    an active exception") although every rank computed the right thing. Called at the end of a
    successful worker only: after a failure the peers may never reach it.
    """
    dist.barrier()
