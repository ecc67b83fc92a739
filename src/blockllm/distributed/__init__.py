"""Everything BlockLLM says to other processes, behind one :class:`Communicator` strategy.

* :mod:`blockllm.distributed.base`: the protocol, :class:`SingleProcess` (no communication) and
  :func:`choose_communicator`.
* :mod:`blockllm.distributed.process_group`: data parallelism without DDP
  (``BlockLLM(process_group=...)``).
* :mod:`blockllm.distributed.fsdp2`, ``fsdp2_top``, ``fsdp2_state``: FSDP2 (``fully_shard``):
  agreement across shards, the sharded coordinate threshold, the checkpoint layout.
* :mod:`blockllm.distributed.fsdp2_checkpoint`: ``save_checkpoint``/``load_checkpoint`` through
  ``torch.distributed.checkpoint``.
* :mod:`blockllm.distributed.buckets`: flat bucketed collectives, shared with the CLI's loop.

The FSDP2 modules import torch's DTensor machinery and are imported by module path when needed.
"""

from blockllm.distributed.base import Communicator, SingleProcess, choose_communicator

__all__ = ["Communicator", "SingleProcess", "choose_communicator"]
