"""The training recipe behind ``blockllm pretrain`` and ``blockllm finetune``.

:class:`TrainingRun` follows torchtune's recipe shape (``setup / train / evaluate /
save_checkpoint / cleanup``). One optimizer step is::

    for micro in range(grad_accum):              # batches are a pure function of the step
        loss = workload.loss(model, batch)       # under bf16 autocast when asked
        (loss / grad_accum).backward()
    clip_grad_norm_(params with a grad, grad_clip)
    optimizer.step(loss=mean loss)               # BlockLLM's trigger sees every step's loss
    scheduler.step(); optimizer.zero_grad(set_to_none=True)

then a metrics line, an evaluation every ``eval_every`` steps, and a checkpoint every
``save_every`` steps. Everything random is seeded and checkpointed (model, optimizer with the
BlockLLM selection state, scheduler, RNGs, running counters), so ``--resume`` reproduces an
uninterrupted run's losses bit for bit on the same hardware and thread count.

Unattended runs must survive what goes wrong in days of training:

* a step whose loss or gradients are NaN/inf changes no parameter and no optimizer state; it is
  counted in every metrics line (``num_skipped_steps``). BlockLLM decides this itself; for other
  optimizers the loop does (see :class:`~blockllm.app.methods.registry.OptimizerSpec`);
* ``--resume`` verifies the newest checkpoint's checksum and falls back to the previous one when
  it is damaged (the damaged file is kept as ``.corrupt``);
* a periodic checkpoint that cannot be written (a full disk) is logged and retried at the next
  save while training goes on; the previous checkpoint stays intact. Only the final or
  signal-triggered save, after which the process would exit, turns the failure into an error.

SIGINT/SIGTERM/SIGHUP do not kill a step half-way: the step finishes, a checkpoint is written, and
:class:`~blockllm.app.training.run_errors.TrainingInterrupted` is raised. A second signal aborts at once (the
last complete checkpoint stays valid, since checkpoints are written atomically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from blockllm.app.methods import get_optimizer_spec
from blockllm.app.training.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    load_latest_checkpoint,
    quarantine,
    restore_rng_state,
    save_checkpoint,
)
from blockllm.app.training.data_parallel import DataParallel, NullMetrics, syncs_itself
from blockllm.app.training.devices import resolve_device, resolve_precision
from blockllm.app.training.memory import MemoryTracker, current_rss_bytes
from blockllm.app.training.metrics import MetricsWriter
from blockllm.app.training.progress import LogProgress, Progress
from blockllm.app.training.run_config import RunConfig
from blockllm.app.training.run_errors import (
    STOP_SIGNALS,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    TrainingInterrupted,
)
from blockllm.app.training.rundir import (
    SUMMARY_FILE,
    check_run_dir,
    init_run_dir,
    write_text_atomic,
)
from blockllm.app.training.schedule import build_scheduler
from blockllm.app.training.workloads import build_workload
from blockllm.app.training.workloads.workload import Workload, default_cache_dir, to_device
from blockllm.optim.protocols import ClipsOwnGradients, StepsDuringBackward

logger = logging.getLogger(__name__)

_MB = 1e6


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's RNGs (every device); numpy's too when it is loaded."""
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)


class TrainingRun:
    """Train one run end to end: ``TrainingRun(config, output_dir).run()``.

    Args:
        config: What to train.
        output_dir: The run directory (see :mod:`blockllm.app.training.rundir` for what it may hold).
        resume: Continue from the directory's last checkpoint.
        cache_dir: Tokenizer and converted-model cache (default: :func:`default_cache_dir`).
        progress: Receives each metrics record (default: a few log lines).
        threads: ``torch.set_num_threads`` for this run (default: leave torch's choice).
        handle_signals: Turn SIGINT/SIGTERM/SIGHUP into "finish the step, checkpoint, stop"
            (only possible in the main thread).
        parallel: This process's rank among data-parallel ones (see
            :mod:`blockllm.app.training.data_parallel`); default: the initialised default process group,
            if any, else a single process.

    Raises:
        RunDirError: the output directory cannot take this run (checked before anything loads).
        CheckpointError: no intact checkpoint to resume from, or it is from another run or a
            newer checkpoint format.
        TrainingInterrupted: a signal stopped training; a checkpoint was saved.
        DistributedTrainingError: data parallel, another rank died or hung past the timeout.
    """

    def __init__(
        self,
        config: RunConfig,
        output_dir: str | Path,
        *,
        resume: bool = False,
        cache_dir: str | Path | None = None,
        progress: Progress | None = None,
        threads: int | None = None,
        handle_signals: bool = True,
        parallel: DataParallel | None = None,
    ) -> None:
        self.config = config
        self.parallel = parallel if parallel is not None else DataParallel.current()
        self.parallel.check(config)
        # Every rank checks the directory and reads the checkpoint; only rank 0 writes there.
        self.run_dir = check_run_dir(output_dir, config, resume=resume)
        # Read and check the checkpoint now: a corrupt or foreign one is reported in a second,
        # not after minutes of loading data and model.
        self._checkpoint: dict[str, Any] | None = None
        self._damaged: list[tuple[Path, CorruptCheckpointError]] = []
        if self.run_dir.resume_from is not None:
            path, self._checkpoint, self._damaged = load_latest_checkpoint(self.run_dir.checkpoints)
            self.run_dir = dataclasses.replace(self.run_dir, resume_from=path)
            _check_checkpoint_config(self._checkpoint, config, path)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.progress: Progress = progress if progress is not None else LogProgress()
        self.threads = threads
        self.handle_signals = handle_signals
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.skipped_steps = 0
        self._warned_skip = False
        self.initial_eval: dict[str, float] | None = None
        self.last_eval: dict[str, float] | None = None
        self.summary: dict[str, Any] = {}
        self._window = _Window()
        self._saved_rss = 0
        self._baseline_rss: int | None = None  # RSS just before this process's first step
        self._stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._metrics: MetricsWriter | NullMetrics | None = None
        self._last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ recipe

    def run(self) -> dict[str, Any]:
        """setup, train, cleanup; returns the summary also written to ``summary.json``."""
        try:
            self.setup()
            self.train()
            return self.summary
        except Exception as exc:
            failure = self.parallel.failure(exc, step=self.step, checkpoint=self._last_checkpoint)
            if failure is None:
                raise
            raise failure from exc
        finally:
            self.cleanup()

    def setup(self) -> None:
        """Load data and model, build optimizer and schedule, restore a checkpoint if resuming."""
        config = self.config
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = self.parallel.device(resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device)
        seed_everything(config.seed)

        with self.parallel.local_main_first():  # one process per machine fills the cache
            self.workload: Workload = build_workload(config, self.cache_dir)
        self.spec = get_optimizer_spec(config.optimizer)
        if self.precision == "bf16-pure" and not self.spec.keeps_masters:
            raise ConfigError(
                f"Invalid precision: 'bf16-pure' with --optimizer {config.optimizer}, which keeps "
                "no fp32 master copies (every step would be rounded to bf16); use --precision "
                "bf16 (autocast over fp32 weights), or a BlockLLM method"
            )
        model = self.workload.model
        if self.precision == "bf16-pure":
            model = self.workload.model = model.to(torch.bfloat16)
        if self.spec.prepare_model is not None:
            model = self.spec.prepare_model(model, config)
            self.workload.model = model
        if config.gradient_checkpointing:
            from blockllm.integrations.hf import prepare_model_for_blockllm

            # transformers' own checkpointing, non-reentrant (correct with frozen tensors), with
            # its input-gradient hooks dropped: BlockLLM's backward still stops below its lowest
            # selected tensor.
            prepare_model_for_blockllm(model, gradient_checkpointing=True)
        self.model = model.to(self.device)
        self.model.train()
        self.optimizer = self.spec.build(self.model, config)
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=config.resolved_warmup_steps, max_steps=config.max_steps,
            min_ratio=config.min_lr_ratio,
        )  # fmt: skip
        self.memory = MemoryTracker(self.device)

        if self._checkpoint is not None:
            self._restore(self._checkpoint, self.run_dir.resume_from)
            self._follow_new_max_steps(int(self._checkpoint["config"]["max_steps"]))
            self._checkpoint = None  # the model and optimizer own the tensors now
        # Data parallel: DDP around the model, unless the optimizer averages its own gradients.
        self._train_model = self.parallel.wrap(self.model, self.optimizer)
        resumed = self.run_dir.resume_from is not None
        if self.parallel.is_main:
            init_run_dir(self.run_dir, config)
            # Only now, with data and model loaded, may the directory change (see rundir).
            for path, _ in self._damaged:
                quarantine(path)
            self._metrics = MetricsWriter(
                self.run_dir.path,
                # A restart from step 0 also cuts the metrics and TensorBoard back (to nothing).
                resume_step=self.step if resumed or self.run_dir.restart else None,
                tensorboard=config.tensorboard,
            )
        else:
            self._metrics = NullMetrics()  # rank 0 alone writes the run directory
        self._damaged = []
        logger.info(
            "Run %s: %s %s with %s on %s (%s, %d threads), %d steps of %d tokens",
            self.run_dir.path, config.command, config.model, config.optimizer, self.device,
            self.precision, torch.get_num_threads(), config.max_steps, config.tokens_per_step_hint,
        )  # fmt: skip
        if config.eval_at_start and not resumed:
            self.initial_eval = self.evaluate()
            self._metrics.log_scalars(0, self.initial_eval)
            logger.info("Before training: %s", _format_eval(self.initial_eval))
        self._install_signal_handlers()

    def train(self) -> None:
        """Run the remaining steps; evaluate, log and checkpoint on the way."""
        config = self.config
        self.progress.start(config.max_steps, self.step)
        self._baseline_rss = current_rss_bytes()
        if self.step >= config.max_steps:
            logger.info("The run is already complete (step %d of %d)", self.step, config.max_steps)
        while self.step < config.max_steps:
            started = time.perf_counter()
            loss, tokens, lr, grad_norm = self._train_step()
            seconds = time.perf_counter() - started
            self.step += 1
            self.tokens += tokens
            self.elapsed += seconds
            self._window.add(loss, tokens, seconds)

            evaluating = self.step == config.max_steps or (
                config.eval_every > 0 and self.step % config.eval_every == 0
            )
            if evaluating or self.step % config.log_every == 0:
                record = self._record(lr, grad_norm)
                if evaluating:
                    eval_started = time.perf_counter()
                    self.last_eval = self.evaluate()
                    record.update(self.last_eval)
                    record["eval_seconds"] = round(time.perf_counter() - eval_started, 4)
                assert self._metrics is not None
                self._metrics.log(record)
                self.progress.update(record)

            # Ranks stop together, on the signal they agreed on during the step.
            stop_signal = self.parallel.stop_signal(self._stop_signal)
            stopping = stop_signal is not None
            # save_every -1 skips the final checkpoint too; a signal still writes one (resumable).
            final = self.step == config.max_steps and config.save_every >= 0
            if stopping or final or (config.save_every > 0 and self.step % config.save_every == 0):
                self._save_or_carry_on(must_succeed=stopping or final)
            if stopping and self.step < config.max_steps:
                assert stop_signal is not None and self._last_checkpoint is not None
                raise TrainingInterrupted(stop_signal, self.step, str(self._last_checkpoint))
        self.summary = self._summary()
        if self.parallel.is_main:
            write_text_atomic(self.run_dir.path / SUMMARY_FILE, _json(self.summary))

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current model (``eval_loss`` and friends)."""
        self.model.eval()
        try:
            with torch.no_grad():
                return self.workload.evaluate(self.model, self.device, self._autocast)
        finally:
            self.model.train()

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (atomically) and return its path."""
        assert self._metrics is not None
        self._metrics.sync()  # metrics on disk always reach at least the checkpoint's step
        payload = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "skipped_steps": self.skipped_steps,
            "window": self._window.state_dict(),
            "memory": self.memory.state_dict(),
            "peak_rss_bytes": max(self._saved_rss, self.memory.summary()["peak_rss_bytes"]),
            "initial_eval": self.initial_eval,
            "last_eval": self.last_eval,
        }
        self._last_checkpoint = save_checkpoint(
            self.run_dir.checkpoints, self.step, payload, keep=self.config.keep_checkpoints
        )
        return self._last_checkpoint

    def _save_or_carry_on(self, *, must_succeed: bool) -> None:
        """Save a checkpoint; a periodic one that cannot be written only costs a log line.

        Losing hours of training because the disk filled up for a while would be the worse
        outcome: the previous checkpoint is intact (saves are atomic), training goes on, and the
        next save tries again. When the process is about to exit (the last step, a signal), the
        checkpoint is the only record of the work, so the failure becomes an error that says
        what survived.
        """
        error: OSError | None = None
        if self.parallel.is_main:  # parameters are replicated: rank 0's checkpoint is everyone's
            try:
                self.save_checkpoint()
            except OSError as exc:
                error = exc
        # Data parallel: the other ranks wait here for rank 0's save and learn its outcome.
        if self.parallel.saved(error is None):
            if not self.parallel.is_main:
                self._last_checkpoint = checkpoint_path(self.run_dir.checkpoints, self.step)
            return
        reason = str(error) if error is not None else "rank 0 could not write it"
        previous = (
            f"the previous checkpoint {self._last_checkpoint} is intact"
            if self._last_checkpoint is not None
            else "no earlier checkpoint of this run exists"
        )
        if must_succeed:
            raise CheckpointError(
                f"could not write the checkpoint of step {self.step} ({reason}); {previous}; "
                "free some space and continue with --resume"
            ) from error
        if self.parallel.is_main:
            logger.error(
                "Could not write the checkpoint of step %d (%s); %s. Training goes on and the "
                "next checkpoint is tried at step %d.",
                self.step, reason, previous, self._next_save_step(),
            )  # fmt: skip

    def _next_save_step(self) -> int:
        every = self.config.save_every
        if every <= 0:
            return self.config.max_steps
        return min(self.config.max_steps, (self.step // every + 1) * every)

    def cleanup(self) -> None:
        """Restore signal handlers, close metrics and progress (also after an error)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self.progress.close()

    # ------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _holding(self, more_to_come: bool) -> contextlib.AbstractContextManager[Any]:
        """Keep this micro-batch's gradients when the optimizer would use them in backward."""
        if more_to_come and isinstance(self.optimizer, StepsDuringBackward):
            return self.optimizer.hold_gradients()
        return contextlib.nullcontext()

    def _train_step(self) -> tuple[float, int, float, float | None]:
        """One optimizer step; returns (mean loss, tokens, lr used, grad norm before clipping)."""
        config = self.config
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = 0
        for micro in range(config.grad_accum):
            # Data parallel: this rank's slice of the global batch (all of it on one process).
            global_batch = self.workload.train_batch(self.step * config.grad_accum + micro)
            batch = to_device(self.parallel.shard(global_batch), self.device)
            more_to_come = micro + 1 < config.grad_accum
            with self.parallel.accumulating(self._train_model, more_to_come), self._holding(
                more_to_come
            ):
                with self._autocast():
                    loss, count = self.workload.loss(self._train_model, batch)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().float()
            tokens += count
        loss_value = float(loss_sum) / config.grad_accum  # the one host sync of the step
        # Data parallel: mean loss and total tokens of all ranks, and the stop vote. An optimizer
        # that syncs itself averages the loss (and every gradient) in its step, once.
        loss_value, tokens = self.parallel.reduce_step(loss_value, tokens, self._stop_signal)

        grad_norm = None
        if config.grad_clip > 0:
            with_grad = [param for param in self.model.parameters() if param.grad is not None]
            # BlockLLM clips its own gradients: some are compacted out of .grad, some were used
            # in backward already, and under data parallelism it averages them first.
            if isinstance(self.optimizer, ClipsOwnGradients):
                grad_norm = float(self.optimizer.clip_grad_norm_(config.grad_clip, parameters=with_grad))
            elif with_grad:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, config.grad_clip))
        lr = float(self.scheduler.get_last_lr()[0])
        self._optimizer_step(loss_value, grad_norm)
        if syncs_itself(self.optimizer) and self.optimizer.last_loss is not None:
            loss_value = self.optimizer.last_loss  # the loss the optimizer averaged over ranks
        self.scheduler.step()
        # Gradients and optimizer state both exist here: their peak is measured now.
        self.memory.sample(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, lr, grad_norm

    def _optimizer_step(self, loss_value: float, grad_norm: float | None) -> None:
        """Step the optimizer, or skip a step with NaN/inf numbers (counted either way).

        The schedule still advances on a skipped step, as with ``torch.amp.GradScaler``: the
        learning rate stays a function of the step, so a resumed run and an uninterrupted one
        agree whether or not steps were skipped.
        """
        counter = self.spec.skipped_steps
        if counter is not None:
            before = counter(self.optimizer)
            self._call_step(loss_value)
            self.skipped_steps += counter(self.optimizer) - before
            return
        if math.isfinite(loss_value) and self._gradients_finite(grad_norm):
            self._call_step(loss_value)
            return
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            logger.warning(
                "Skipped step %d: non-finite loss or gradient (loss %s); parameters and optimizer "
                "state are unchanged. Later skips are only counted (num_skipped_steps in "
                "metrics.jsonl).",
                self.step + 1, loss_value,
            )  # fmt: skip
        else:
            logger.debug("Skipped step %d (non-finite loss or gradient)", self.step + 1)

    def _call_step(self, loss_value: float) -> None:
        if self.spec.takes_loss:
            self.optimizer.step(loss=loss_value)
        else:
            self.optimizer.step()

    def _gradients_finite(self, grad_norm: float | None) -> bool:
        if grad_norm is not None:  # clipping computed it already, NaN/inf included
            return math.isfinite(grad_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        # The global 2-norm, NaN/inf when any entry is; the gradients are left as they are.
        return math.isfinite(float(torch.nn.utils.get_total_norm(grads, 2.0)))

    def _record(self, lr: float, grad_norm: float | None) -> dict[str, Any]:
        loss, tokens, seconds = self._window.take()
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed, 4),
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        record["peak_rss_mb"] = round(
            max(self._saved_rss, self.memory.summary()["peak_rss_bytes"]) / _MB, 1
        )
        if self.device.type == "cuda":
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / _MB, 1)
        for category, value in self.memory.peak.items():
            record[f"peak_{category}_mb"] = round(value / _MB, 3)
        record.update(self.spec.stats(self.optimizer))
        # Every optimizer's lines carry it; for BlockLLM it equals the optimizer's own counter.
        record["num_skipped_steps"] = self.skipped_steps
        return record

    # ------------------------------------------------------------------ resume

    def _restore(self, record: dict[str, Any], path: Path) -> None:
        try:
            self.model.load_state_dict(record["model"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match the model ({_first_line(exc)})"
            ) from exc
        try:
            self.optimizer.load_state_dict(record["optimizer"])
            self.scheduler.load_state_dict(record["scheduler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match the optimizer ({_first_line(exc)})"
            ) from exc
        restore_rng_state(record["rng"])
        self.step = int(record["step"])
        self.tokens = int(record["tokens"])
        self.elapsed = float(record["elapsed_s"])
        counter = self.spec.skipped_steps
        # Format-1 checkpoints (blockllm 0.1.0) predate the loop's counter; BlockLLM kept its own.
        self.skipped_steps = int(
            record.get("skipped_steps", counter(self.optimizer) if counter is not None else 0)
        )
        self._window.load_state_dict(record["window"])
        self.memory.load_state_dict(record["memory"])
        self._saved_rss = int(record["peak_rss_bytes"])
        self.initial_eval = record["initial_eval"]
        self.last_eval = record["last_eval"]
        self._last_checkpoint = path
        logger.info("Resumed from %s at step %d", path, self.step)

    def _follow_new_max_steps(self, saved_max_steps: int) -> None:
        """Recompute the schedule when ``--resume`` changed ``max_steps``; log the lr jump.

        The restored scheduler still holds the checkpoint's total. The schedule is a function
        of ``max_steps``, so it is rebuilt for the new total at the checkpoint's step: the
        remaining steps use the learning rates a run started with the new ``max_steps`` would
        use there. After a completed cosine decay (a finished run trained longer) that means
        the learning rate rises again, from the decay's floor back up the new curve.
        """
        config = self.config
        if saved_max_steps == config.max_steps:
            return
        before = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=config.resolved_warmup_steps, max_steps=config.max_steps,
            min_ratio=config.min_lr_ratio, start_step=self.step,
        )  # fmt: skip
        after = float(self.optimizer.param_groups[0]["lr"])
        logger.warning(
            "max_steps changed from %d to %d on resume: the learning-rate schedule (warmup %d "
            "steps, cosine to %g of the peak) is recomputed for %d steps, so step %d uses lr %.3g "
            "instead of %.3g",
            saved_max_steps, config.max_steps, config.resolved_warmup_steps, config.min_lr_ratio,
            config.max_steps, self.step + 1, after, before,
        )  # fmt: skip

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag here: logging or saving from inside a signal handler can re-enter
        # code the main thread is in the middle of. The loop acts at the end of the step.
        if self._stop_signal is None:
            self._stop_signal = signum
            if not self.parallel.second_signal_aborts:
                return  # torchrun repeats signals to its workers, and escalates to SIGKILL itself
            # A second signal is not ignored: it gets the previous behaviour (KeyboardInterrupt
            # for SIGINT, termination for SIGTERM and SIGHUP).
            previous = self._previous_handlers.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    # ------------------------------------------------------------------ summary

    def _summary(self) -> dict[str, Any]:
        from blockllm import __version__

        memory = self.memory.summary()
        memory["peak_rss_bytes"] = max(memory["peak_rss_bytes"], self._saved_rss)
        if self._baseline_rss is not None:
            memory["baseline_rss_bytes"] = self._baseline_rss
        return {
            "command": self.config.command,
            "model": self.config.model,
            "optimizer": self.config.optimizer,
            "steps": self.step,
            "tokens": self.tokens,
            "train_seconds": round(self.elapsed, 3),
            "tokens_per_s": self.tokens / self.elapsed if self.elapsed > 0 else 0.0,
            "initial_eval": self.initial_eval,
            "final_eval": self.last_eval,
            "memory": memory,
            "optimizer_stats": self.spec.stats(self.optimizer),
            "num_skipped_steps": self.skipped_steps,
            "info": self.workload.info,
            "device": str(self.device),
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "blockllm_version": __version__,
        }


class _Window:
    """Losses, tokens and seconds since the last metrics line (checkpointed for exact resumes)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.losses, self.tokens, self.seconds = [], 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> tuple[float, int, float]:
        loss = math.fsum(self.losses) / len(self.losses) if len(self.losses) > 1 else self.losses[0]
        taken = (loss, self.tokens, self.seconds)
        self.reset()
        return taken

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [float(value) for value in state["losses"]]
        self.tokens = int(state["tokens"])
        self.seconds = float(state["seconds"])


def _check_checkpoint_config(record: dict[str, Any], config: RunConfig, path: Path) -> None:
    """Refuse a checkpoint written by a run with different settings (e.g. copied in by hand).

    A new ``max_steps`` is no different run (see :meth:`RunConfig.resume_conflicts`), unless it
    lies before the checkpoint's step: those steps cannot be taken back.
    """
    try:
        saved = RunConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} holds no valid run config ({exc})") from exc
    changed = config.resume_conflicts(saved)
    if changed:
        names = ", ".join(sorted(changed))
        raise CheckpointError(
            f"checkpoint {path} was saved by a different run (differs in: {names})"
        )
    step = int(record["step"])
    if config.max_steps < step:
        raise CheckpointError(
            f"Invalid max_steps: {config.max_steps} (checkpoint {path} is at step {step} "
            f"already; give --max-steps {step} or more to continue it)"
        )


def _format_eval(values: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in values.items())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0][:300] if lines else type(exc).__name__


def _json(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2) + "\n"


__all__ = ["TrainingRun", "seed_everything"]
