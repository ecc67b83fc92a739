"""Data parallelism for the training loop: one process per device, launched by ``torchrun``.

Every rank builds the same model from the same seed and trains it on its own slice of each global
batch; gradients are averaged, so the replicas stay identical and ``W`` ranks compute what one
process would on the whole batch. BlockLLM averages its selected gradients itself
(``BlockLLM(process_group=...)``, see :mod:`blockllm.optim.distributed`); every other method is
wrapped in ``DistributedDataParallel``. Methods that change which tensors are trainable while they
train (LISA, BAdam) are refused: DDP fixes the tensors it synchronises when it is built, so their
replicas would drift apart without any error.

Rank 0 alone writes the run directory (config, metrics, TensorBoard, checkpoints, summary); the
parameters are replicated, so its checkpoint is everyone's. The loop talks to this module through
one :class:`DataParallel` object, whose single-process instance does nothing, so the loop never
branches on the world size.

When another rank dies, the next collective fails here: gloo raises at once when the peer's
connection closes, or after ``timeout`` when a peer hangs. :meth:`DataParallel.failure` turns that
into one :class:`~blockllm.app.training.run_errors.DistributedTrainingError` that names the likely cause and
the last intact checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from blockllm.app.training.devices import resolve_device
from blockllm.app.training.run_errors import ConfigError, DistributedTrainingError
from blockllm.errors import BlockLLMError
from blockllm.optim.protocols import SyncsItself

if TYPE_CHECKING:
    from pathlib import Path

    from blockllm.app.training.run_config import RunConfig
    from blockllm.app.training.workloads.workload import Batch

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0

# Methods whose trainable set changes during training; see the module docstring.
_NOT_DATA_PARALLEL = {
    "lisa": "it switches the trainable layers every --patience steps",
    "badam": "it switches the trainable block every --patience steps",
}
# What a failed collective says (gloo, NCCL, the c10d store); translated into one clear line.
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|broken pipe|timed out|timeout|socket",
    re.IGNORECASE,
)
# gloo prefixes its messages with the C++ source position: "[/path/to/pair.cc:553] ".
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*")


@dataclass(frozen=True)
class LaunchInfo:
    """The process's place in a ``torchrun`` launch, read from its environment."""

    rank: int
    local_rank: int
    world_size: int


def launch_info(environ: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """Rank, local rank and world size when launched by ``torchrun`` with 2+ processes, else None.

    torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
    for every worker. A world of one process is an ordinary run: no process group is needed.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        world_size = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    if world_size < 2:
        return None
    return LaunchInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def syncs_itself(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer that averages gradients and the loss over its own process group."""
    return isinstance(optimizer, SyncsItself) and optimizer.process_group is not None


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of a ``torchrun`` launch (for the CLI's output)."""
    info = launch_info()
    return info is None or info.rank == 0


def data_parallel_group() -> Any:
    """The group BlockLLM averages over: the whole world when 2+ ranks are initialised, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class DataParallel:
    """What the training loop does differently as one of ``world_size`` data-parallel ranks.

    ``DataParallel()`` is the single-process instance: every method is then a no-op or an identity,
    and the loop's arithmetic is exactly that of a run without torch.distributed.

    Args:
        rank: This process's rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU, and who fills the local cache first).
        timeout_s: The process group's collective timeout (for error messages).
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, timeout_s: float = 0.0
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.timeout_s = timeout_s
        self.failed = False
        self._syncs_itself = False
        self._agreed_signal: int | None = None

    @classmethod
    def current(cls) -> DataParallel:
        """The data parallelism of an already initialised default process group (or none)."""
        if data_parallel_group() is None:
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def second_signal_aborts(self) -> bool:
        """Whether a second SIGINT/SIGTERM should abort at once instead of finishing the step.

        Not under torchrun: it forwards the signals it receives to its workers, so a worker that
        Ctrl-C reached directly gets the same signal twice; torchrun escalates to SIGKILL on its
        own after a grace period.
        """
        return not self.active

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and reports progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ set-up

    def check(self, config: RunConfig) -> None:
        """Refuse settings that cannot run data parallel, before anything is loaded.

        Raises:
            ConfigError: the batch does not split evenly, or the method cannot run under DDP.
        """
        if not self.active:
            return
        if config.batch_size % self.world_size:
            raise ConfigError(
                f"Invalid batch_size: {config.batch_size} sequences do not split evenly over "
                f"{self.world_size} ranks (--batch-size is the global batch of all ranks together; "
                f"use a multiple of {self.world_size})"
            )
        reason = _NOT_DATA_PARALLEL.get(config.optimizer)
        if reason is not None:
            raise ConfigError(
                f"--optimizer {config.optimizer} cannot train data parallel under torchrun: "
                f"{reason}, and DistributedDataParallel only synchronises the tensors that were "
                "trainable when it was built, so the ranks would silently drift apart; use "
                "blockllm (it synchronises its own selection) or adamw, or run on one process"
            )

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` on GPUs, the given one otherwise."""
        if not self.active or device.type != "cuda":
            return device
        local = torch.device("cuda", self.local_rank)
        if device.index is not None and device.index != self.local_rank:
            logger.warning("Under torchrun rank %d uses %s, not %s", self.rank, local, device)
        torch.cuda.set_device(local)
        return local

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Let local rank 0 run the block first (it fills the tokenizer/model cache), then the rest.

        The barrier also guarantees that every rank has checked the run directory and read its
        checkpoint before rank 0 writes anything there.
        """
        if not self.active:
            yield
            return
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The module the training steps run: DDP around ``model``, or ``model`` itself.

        An optimizer built with a process group (BlockLLM) averages its own gradients; DDP would
        only ever synchronise the tensors trainable at this moment, which BlockLLM changes.
        """
        self._syncs_itself = syncs_itself(optimizer)
        if not self.active or self._syncs_itself:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # Buffers (rotary tables) are built identically on every rank: no need to resend them.
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    # ------------------------------------------------------------------ every step

    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch: rank ``r`` gets the ``r``-th of ``W`` equal slices.

        Slicing the global batch (rather than drawing a per-rank one) makes the ``W`` ranks see
        together exactly the batch one process would, padding and all.

        Raises:
            ValueError: the batch's rows do not split evenly over the ranks.
        """
        if not self.active:
            return batch
        sharded = {}
        for key, value in batch.items():
            rows = value.shape[0]
            if rows % self.world_size:
                raise ValueError(
                    f"A batch of {rows} rows does not split evenly over {self.world_size} ranks "
                    "(is the training set smaller than --batch-size?)"
                )
            size = rows // self.world_size
            sharded[key] = value[self.rank * size : (self.rank + 1) * size]
        return sharded

    def accumulating(
        self, model: nn.Module, more_to_come: bool
    ) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` for all but the last micro-batch of a step (one all-reduce per step)."""
        no_sync = getattr(model, "no_sync", None)
        if more_to_come and no_sync is not None:
            return no_sync()
        return contextlib.nullcontext()

    def reduce_step(self, loss: float, tokens: int, local_signal: int | None) -> tuple[float, int]:
        """The step's mean loss and total tokens over all ranks; also votes on stopping.

        One collective per step carries the loss, the token count and whether any rank got
        SIGINT/SIGTERM, so that all ranks stop after the same step (see :meth:`stop_signal`).
        An optimizer that syncs itself averages the loss in its own step (the loop then reads
        it back from ``optimizer.last_loss``); the loss is then left out here, so that it is
        averaged once.
        """
        if not self.active:
            return loss, tokens
        local_loss = loss
        if self._syncs_itself:
            loss = 0.0  # averaged by the optimizer's step instead
        device = _collective_device()
        values = torch.tensor(
            [loss, float(tokens), 0.0 if local_signal is None else 1.0],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(values)
        self._agreed_signal = None
        if values[2].item() > 0:
            signum = torch.tensor([local_signal or 0], dtype=torch.int64, device=device)
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            self._agreed_signal = int(signum.item())
        mean = local_loss if self._syncs_itself else float(values[0].item()) / self.world_size
        return mean, round(values[1].item())

    def stop_signal(self, local_signal: int | None) -> int | None:
        """The signal that stops training after this step, the same on every rank.

        A single process stops on its own signal. Ranks stop on the vote of the step's
        :meth:`reduce_step`: a signal that arrives later counts at the next step, on every rank.
        """
        return self._agreed_signal if self.active else local_signal

    def saved(self, ok: bool) -> bool:
        """Wait for rank 0's checkpoint save and learn whether it succeeded (a barrier).

        Rank 0 writes alone (the parameters are replicated) and the write is atomic; no
        collective runs during it, so a rank failing meanwhile cannot leave a partial file.
        """
        if not self.active:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ failures

    def failure(
        self, exc: BaseException, *, step: int, checkpoint: Path | None
    ) -> DistributedTrainingError | None:
        """The clear error for a failed collective (a rank died or hung), or None for other errors."""
        if not self.active or isinstance(exc, BlockLLMError) or not _is_collective_failure(exc):
            return None
        self.failed = True
        saved = (
            f"the last checkpoint {checkpoint} is intact; continue with --resume"
            if checkpoint is not None
            else "no checkpoint of this run was written yet"
        )
        timeout = (
            f"--dist-timeout {self.timeout_s:g} s" if self.timeout_s > 0 else "the group's timeout"
        )
        return DistributedTrainingError(
            f"rank {self.rank} of {self.world_size} lost contact with the other ranks after step "
            f"{step} ({_first_sentence(exc)}): another rank probably died (its own error or "
            f"torchrun's failure report names it) or fell more than {timeout} behind; {saved}"
        )


@contextlib.contextmanager
def data_parallel(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DataParallel]:
    """Join the ``torchrun`` process group for the duration of a run (a no-op outside torchrun).

    Args:
        device_name: The run's ``--device``: CUDA uses NCCL, everything else gloo.
        timeout_s: How long a collective waits for a missing rank before it fails.

    Raises:
        ConfigError: an MPS device (no collective backend) or a timeout that is not positive.
        DistributedTrainingError: the process group could not be formed.
    """
    info = launch_info()
    if info is None:
        yield DataParallel()
        return
    if not timeout_s > 0:
        raise ConfigError(f"Invalid dist_timeout: {timeout_s} (must be > 0 seconds)")
    device = resolve_device(device_name)
    if device.type == "mps":
        raise ConfigError("Invalid device: 'mps' cannot run under torchrun (use cpu or cuda)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedTrainingError(
            f"rank {info.rank} of {info.world_size} could not join the process group with "
            f"{backend} ({_first_sentence(exc)}); check MASTER_ADDR/MASTER_PORT and torchrun's "
            "--rdzv-endpoint"
        ) from exc
    logger.debug("Rank %d of %d joined the %s process group", info.rank, info.world_size, backend)
    parallel = DataParallel(info.rank, info.world_size, info.local_rank, timeout_s)
    try:
        yield parallel
        # A rank that tears gloo down while a peer is still inside a collective aborts that
        # peer ("terminate called without an active exception"): leave together. (After a
        # failure here torchrun stops the peers; they may never reach this.)
        dist.barrier()
    finally:
        # After a peer failure the group is broken; tearing it down must not add a second error.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class NullMetrics:
    """The metrics writer of ranks other than 0: they write nothing to the run directory."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _collective_device() -> torch.device:
    # NCCL communicates CUDA tensors only; gloo CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _SOURCE_PREFIX.sub("", text)
    return text.split(". ")[0].rstrip(".")[:300]


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DataParallel",
    "LaunchInfo",
    "NullMetrics",
    "data_parallel",
    "data_parallel_group",
    "is_main_process",
    "launch_info",
]
