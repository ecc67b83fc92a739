"""BlockLLM with the Hugging Face ``Trainer``: optimizer factory, callback, checkpointing helper.

Usage (nothing else in a Trainer script changes)::

    from blockllm.integrations import BlockLLMCallback, create_blockllm_optimizer

    opt = create_blockllm_optimizer(model, args, sparsity=0.9, patience=100)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None),            # None: Trainer builds its own scheduler
                      callbacks=[BlockLLMCallback()])     # finds the Trainer's BlockLLM itself
    trainer.train()                                       # or train(resume_from_checkpoint=True)

Only public extension points are used: ``Trainer(optimizers=...)``, a ``TrainerCallback``, a
forward hook on the model and the model's own checkpointing methods. Nothing is monkey-patched.

How each piece works, and why:

* **The loss reaches the reselection trigger** through a forward hook that the callback puts on
  the model for the length of ``train()``. Trainer calls ``optimizer.step()`` without a loss, so
  the hook keeps the (detached) ``loss`` of every training forward, and just before the optimizer
  step (``on_pre_optimizer_step``) the callback hands one number per step to
  :meth:`BlockLLM.record_loss`: the mean of the micro-batch losses, or their sum when Trainer
  passed ``num_items_in_batch`` (each micro-batch loss is then already normalised over the whole
  accumulated batch). Either way the trigger sees the same per-step loss that Trainer logs.
  Evaluation forwards (``model.eval()`` or no grad) are ignored.
* **Resume restores the selection** by itself: Trainer reloads ``optimizer.pt`` with
  ``torch.load(weights_only=True)`` and calls ``optimizer.load_state_dict``, and BlockLLM's state
  carries the selection, the trigger window and the visit counts and sets ``requires_grad``
  accordingly. The callback checks on ``on_train_begin`` that the trainable tensors are exactly
  the restored selection (re-applying it if anything changed them), and warns when a resumed run
  has no optimizer state (``save_only_model=True`` checkpoints), since selection then starts over.
* **Gradient checkpointing** must be non-reentrant: with reentrant checkpointing a checkpointed
  layer whose inputs need no gradient (everything below it frozen) silently gives its selected
  weights no gradient. The callback (and :func:`prepare_model_for_blockllm`) therefore add the
  input-gradient hooks when reentrant checkpointing is active, and remove them when it is
  non-reentrant, where they are not needed and would force every backward down to the
  embeddings, losing BlockLLM's early stop below the lowest selected tensor.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as err:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "blockllm.integrations.hf needs Hugging Face transformers and accelerate; install them "
        f"with: pip install 'blockllm[hf]' ({err})"
    ) from err

from blockllm.config import BlockLLMConfig
from blockllm.integrations.accelerate import unwrap_blockllm
from blockllm.optim import BlockLLM
from blockllm.parameter_groups import trainable_vocabulary

logger = logging.getLogger(__name__)

#: Prefix of every key the callback adds to Trainer's logs.
LOG_PREFIX = "blockllm/"


# ---------------------------------------------------------------------------------------- optimizer


def _fit_to_trainer(args: TrainingArguments, options: dict[str, Any]) -> dict[str, Any]:
    """The BlockLLM options that make Trainer's clipping and accumulation mean what they say.

    Trainer clips with ``torch.nn.utils.clip_grad_norm_``, which sees only ``.grad``: not the
    gradients BlockLLM keeps compacted, nor those a rest rule already used in backward. So the
    clip moves into BlockLLM (``max_grad_norm``) and Trainer's is switched off
    (``args.max_grad_norm = 0``). Trainer cannot wrap its micro-batches in
    ``hold_gradients()``, so under gradient accumulation a rest rule steps in ``step()``.
    """
    changes: dict[str, Any] = {}
    if args.max_grad_norm and "max_grad_norm" not in options:
        changes["max_grad_norm"] = float(args.max_grad_norm)
        logger.info(
            "create_blockllm_optimizer: BlockLLM clips inside its step (max_grad_norm=%s, moved "
            "from TrainingArguments, whose max_grad_norm is now 0)", args.max_grad_norm,
        )  # fmt: skip
        args.max_grad_norm = 0.0
    config = options.get("config") or BlockLLMConfig()
    if args.gradient_accumulation_steps > 1 and options.get("rest", config.rest) != "none":
        changes.setdefault("rest_in_backward", False)
    return changes


def create_blockllm_optimizer(
    model: nn.Module,
    training_args: TrainingArguments,
    *,
    vocab_lr_scale: float | None = None,
    **blockllm_kwargs: Any,
) -> BlockLLM:
    """Build a :class:`~blockllm.BlockLLM` for ``model`` the way Trainer builds its AdamW.

    The trainable parameters are split into a weight-decay group and a no-decay group (biases and
    norm weights) with Trainer's own rule, and ``lr``, ``betas``, ``eps`` and ``weight_decay``
    come from ``training_args``. Both groups carry parameter names, which BlockLLM needs.

    Args:
        model: the model Trainer will train (before ``Trainer`` wraps it).
        training_args: the ``TrainingArguments`` given to Trainer. Read: ``learning_rate``,
            ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``weight_decay``.
        vocab_lr_scale: a third group for the embedding and output head (decayed like the
            matrices) at this multiple of the lr, which Trainer's schedule scales like the others
            (:func:`blockllm.param_groups`; 20 was BlockLLM's best in the CPU pretraining
            suites). None (default): they stay in the decay group.
        **blockllm_kwargs: any :class:`~blockllm.BlockLLM` argument (``sparsity``, ``patience``,
            ``trigger``, ``include``, ...). ``lr``, ``betas``, ``eps`` or ``weight_decay`` given
            here win over ``training_args``.

    Returns:
        The optimizer, to pass as ``Trainer(optimizers=(optimizer, None))``.

    Raises:
        TypeError: ``training_args`` is not a ``TrainingArguments``, or a BlockLLM argument is
            of the wrong type.
        ValueError: the model has no trainable parameter, a BlockLLM argument is invalid, or
            ``vocab_lr_scale`` is not positive or the model has no embedding to give it to.

    Example:
        >>> opt = create_blockllm_optimizer(model, args, sparsity=0.9, patience=50)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   optimizers=(opt, None), callbacks=[BlockLLMCallback()])
    """
    if not isinstance(training_args, TrainingArguments):
        raise TypeError(
            "Invalid training_args: expected transformers.TrainingArguments, got "
            f"{type(training_args).__name__}"
        )
    options: dict[str, Any] = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
        "weight_decay": training_args.weight_decay,
    }
    overridden = sorted(set(options) & set(blockllm_kwargs))
    if overridden:
        logger.info(
            "create_blockllm_optimizer: %s given explicitly, not from TrainingArguments",
            ", ".join(overridden),
        )
    options.update(blockllm_kwargs)
    options.update(_fit_to_trainer(training_args, options))

    # Trainer's own rule (transformers.Trainer.get_decay_parameter_names) changes between
    # versions; it is a plain function of the model, so calling it keeps our split identical to
    # the one the Trainer would build for AdamW.
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    groups: dict[bool, dict[str, list[Any]]] = {
        True: {"params": [], "names": []},
        False: {"params": [], "names": []},
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = groups[name in decay_names]
            group["params"].append(param)
            group["names"].append(name)
    param_groups = [
        {**groups[decays], "weight_decay": options["weight_decay"] if decays else 0.0}
        for decays in (True, False)
        if groups[decays]["params"]
    ]
    if vocab_lr_scale is not None:
        param_groups = _with_vocabulary_group(model, param_groups, options, vocab_lr_scale)
    if not param_groups:
        raise ValueError(
            f"Invalid model: {type(model).__name__} has no parameter with requires_grad=True"
        )
    return BlockLLM(param_groups, **options)


def _with_vocabulary_group(
    model: nn.Module, groups: list[dict[str, Any]], options: dict[str, Any], scale: float
) -> list[dict[str, Any]]:
    """``groups`` with the embedding and head moved into a group of their own at ``scale`` x lr."""
    vocabulary = trainable_vocabulary(model, "vocab_lr_scale", scale)
    moved: dict[str, list[Any]] = {"params": [], "names": []}
    for group in groups:
        members = list(zip(group["names"], group["params"]))
        group["names"], group["params"] = [], []
        for name, param in members:
            target = moved if id(param) in vocabulary else group
            target["names"].append(name)
            target["params"].append(param)
    groups = [group for group in groups if group["params"]]
    if moved["params"]:
        vocab_lr = options["lr"] * scale
        groups.append({**moved, "weight_decay": options["weight_decay"], "lr": vocab_lr})
        logger.info(
            "create_blockllm_optimizer: %s at lr %.3g (%s x %.3g)",
            ", ".join(moved["names"]), vocab_lr, scale, options["lr"],
        )  # fmt: skip
    return groups


# ------------------------------------------------------------------------ gradient checkpointing


def _uses_reentrant(checkpoint_fn: Any) -> bool:
    # transformers stores functools.partial(torch.utils.checkpoint.checkpoint, **kwargs) on each
    # checkpointed module. torch treats a missing use_reentrant as True, and so do we for any
    # function we cannot read: assuming reentrant only costs speed, never gradients.
    if isinstance(checkpoint_fn, functools.partial):
        keywords = checkpoint_fn.keywords or {}
        if "use_reentrant" in keywords:
            return bool(keywords["use_reentrant"])
    return True


def checkpointing_mode(model: nn.Module) -> str | None:
    """Which activation checkpointing ``model`` uses now.

    Args:
        model: a ``transformers.PreTrainedModel`` (any module that follows its
            ``gradient_checkpointing`` / ``_gradient_checkpointing_func`` convention).

    Returns:
        ``"reentrant"``, ``"non_reentrant"``, or ``None`` when no module checkpoints. A model
        that mixes both (or whose checkpoint function cannot be read) counts as reentrant.
    """
    reentrant = []
    for module in model.modules():
        # `is True`: the attribute is a plain flag on HF modules; anything else is not ours.
        if getattr(module, "gradient_checkpointing", False) is True:
            reentrant.append(_uses_reentrant(getattr(module, "_gradient_checkpointing_func", None)))
    if not reentrant:
        return None
    return "reentrant" if any(reentrant) else "non_reentrant"


def _drop_input_grad_hooks(model: nn.Module) -> None:
    try:
        model.disable_input_require_grads()
    except AttributeError:
        # transformers 4.x raises AttributeError when no hook was ever registered.
        pass


def _fit_input_grads_to_checkpointing(model: nn.Module) -> str | None:
    """Make activation checkpointing safe and cheap for BlockLLM; return the mode found."""
    mode = checkpointing_mode(model)
    if mode is None:
        return None
    has_hook_api = hasattr(model, "enable_input_require_grads") and hasattr(
        model, "disable_input_require_grads"
    )
    if mode == "reentrant":
        if not has_hook_api:
            logger.warning(
                "%s uses reentrant activation checkpointing and has no "
                "enable_input_require_grads(): a selected tensor below frozen layers will get no "
                "gradient. Enable checkpointing with use_reentrant=False.",
                type(model).__name__,
            )
            return mode
        # Drop first so the hooks exist exactly once, however often this runs.
        _drop_input_grad_hooks(model)
        model.enable_input_require_grads()
        logger.warning(
            "BlockLLM: reentrant activation checkpointing is on, so the input embeddings' output "
            "now requires grad (otherwise selected tensors below frozen layers silently get no "
            "gradient). Backward then always runs down to the embeddings; use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} to keep BlockLLM's backward "
            "saving."
        )
    elif has_hook_api:
        # Non-reentrant checkpointing delivers gradients to any parameter that requires grad;
        # the input hooks transformers adds would only force backward through frozen layers.
        _drop_input_grad_hooks(model)
        logger.info(
            "BlockLLM: non-reentrant activation checkpointing; input-gradient hooks removed so "
            "backward stops below the lowest selected tensor"
        )
    return mode


def prepare_model_for_blockllm(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Set up a transformers model for BlockLLM training, in place.

    With ``gradient_checkpointing=True`` it turns on activation checkpointing in non-reentrant
    mode (unless ``gradient_checkpointing_kwargs`` says otherwise) and sets
    ``config.use_cache=False``. In every case it then fits the input-gradient hooks to the
    checkpointing mode: present for reentrant checkpointing (needed for correctness), absent
    otherwise (so backward stops below the lowest selected tensor). Use it in plain and accelerate
    loops; under Trainer, :class:`BlockLLMCallback` does the second part on ``on_train_begin``.

    Args:
        model: a ``transformers.PreTrainedModel``.
        gradient_checkpointing: turn activation checkpointing on (default: True).
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``;
            ``use_reentrant`` defaults to False here.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: checkpointing was asked for and the model has no method to enable it.

    Example:
        >>> model = prepare_model_for_blockllm(LlamaForCausalLM(config))
        >>> opt = BlockLLM(model.named_parameters(), sparsity=0.9)
    """
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise TypeError(
                f"Invalid model: {type(model).__name__} has no activation_checkpointing_enable() "
                "or gradient_checkpointing_enable(); pass gradient_checkpointing=False"
            )
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            # The KV cache is useless in training and conflicts with checkpointing.
            config.use_cache = False
    _fit_input_grads_to_checkpointing(model)
    return model


# ---------------------------------------------------------------------------------------- callback


def _model_loss(output: Any) -> torch.Tensor | None:
    # ModelOutput is a Mapping; tuple outputs are ambiguous (logits or loss first), so skipped.
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return loss
    return None


class BlockLLMCallback(TrainerCallback):
    """Connects a Trainer run to its :class:`~blockllm.BlockLLM` optimizer.

    * feeds each optimizer step's training loss to the reselection trigger (a forward hook on the
      model, installed on ``on_train_begin`` and removed on ``on_train_end``);
    * adds ``blockllm/...`` entries to Trainer's logs: reselections, coordinates selected,
      trainable fraction, selection time, skipped steps and :meth:`BlockLLM.memory_report`
      bytes (taken right after the optimizer step, while gradients still exist);
    * reports the norm BlockLLM clips against as ``grad_norm`` (with a rest rule the whole
      gradient's; Trainer's own covers only ``.grad``, which BlockLLM empties as it uses
      gradients in backward);
    * logs every reselection with its global step (``logging.INFO``);
    * checks on resume that the trainable tensors are the restored selection;
    * fits the input-gradient hooks to the gradient checkpointing mode (see the module doc).

    Args:
        optimizer: the BlockLLM given to Trainer. ``None`` (default) takes the Trainer's own
            optimizer at ``on_train_begin``; either way it must be a BlockLLM.
        feed_loss: feed the loss to the trigger (default: True). Turn off when your own code
            calls ``record_loss``, e.g. from a ``compute_loss`` override.
        manage_checkpointing: fit the input-gradient hooks to the checkpointing mode on
            ``on_train_begin`` (default: True).

    Raises:
        TypeError: when the Trainer's optimizer is not a BlockLLM: at ``Trainer(...)`` if it was
            passed in ``optimizers=``, else at ``train()`` before the first step.
        ValueError: ``optimizer`` was given and the Trainer steps another one (same timing).

    Note:
        Trainer calls user callbacks after its reporting integrations (``report_to``), so the
        ``blockllm/...`` values are in ``trainer.state.log_history``, the printed logs and every
        callback after this one, but a W&B/TensorBoard callback created by ``report_to`` logs the
        dict before they are added. Pass those integrations' callbacks after this one
        (``report_to=[]`` plus ``callbacks=[BlockLLMCallback(), WandbCallback()]``) to record them.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   optimizers=(create_blockllm_optimizer(model, args), None),
        ...                   callbacks=[BlockLLMCallback()])
    """

    def __init__(
        self,
        optimizer: BlockLLM | None = None,
        *,
        feed_loss: bool = True,
        manage_checkpointing: bool = True,
    ) -> None:
        if optimizer is not None:
            optimizer = unwrap_blockllm(optimizer)
        self._given = optimizer
        self.optimizer: BlockLLM | None = optimizer
        self.feed_loss = feed_loss
        self.manage_checkpointing = manage_checkpointing
        #: Global steps (1-based, as Trainer counts) after which a reselection was scheduled.
        self.reselection_steps: list[int] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._losses: list[torch.Tensor] = []
        self._losses_are_shares = False
        self._warned_no_loss = False
        self._seen_selections = 0
        self._seen_pending = False
        self._memory: dict[str, int] = {}
        self._grad_norm: torch.Tensor | None = None

    # -------------------------------------------------------------------------- wiring

    def _resolve(self, optimizer: Any) -> BlockLLM:
        try:
            found = unwrap_blockllm(optimizer)
        except TypeError as err:
            raise TypeError(
                f"BlockLLMCallback needs the Trainer to train with BlockLLM: {err}. Pass "
                "Trainer(optimizers=(create_blockllm_optimizer(model, args), None))."
            ) from None
        if self._given is not None and found is not self._given:
            raise ValueError(
                "BlockLLMCallback was given a different BlockLLM than the one the Trainer steps; "
                "pass the same object to Trainer(optimizers=...), or build the callback with no "
                "optimizer"
            )
        return found

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Fail at construction when Trainer was handed another optimizer. When it was handed
        # none, a create_optimizer() override may still build a BlockLLM: check at train time.
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            self._resolve(optimizer)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = self._resolve(kwargs.get("optimizer"))
        self.optimizer = optimizer
        if getattr(args, "world_size", 1) > 1 and optimizer.process_group is None:
            # Trainer's DDP averages only the tensors it saw as trainable; BlockLLM must average
            # what it selects itself, or the ranks drift apart silently.
            raise RuntimeError(
                f"BlockLLM under Trainer with {args.world_size} processes needs "
                "process_group=torch.distributed.group.WORLD (create_blockllm_optimizer(model, "
                "args, process_group=torch.distributed.group.WORLD)) and "
                "TrainingArguments(ddp_find_unused_parameters=True), or the replicas drift apart"
            )
        _check_fits_trainer(optimizer, args)
        model = kwargs.get("model")
        if model is not None and self.manage_checkpointing:
            _fit_input_grads_to_checkpointing(model)
        self._remove_hook()
        self._losses.clear()
        if self.feed_loss and model is not None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        elif self.feed_loss:
            logger.warning("BlockLLMCallback got no model from Trainer; the loss is not fed")
        if state.global_step > 0:
            self._check_resumed(optimizer, state.global_step)
        self._seen_selections = optimizer.num_selections
        self._seen_pending = optimizer.selection_pending
        self._memory = {}

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hook()
        self._losses.clear()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -------------------------------------------------------------------------- the loss

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # Evaluation and prediction run in eval mode or without grad: not training losses.
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _model_loss(output)
        if loss is None:
            return
        self._losses.append(loss.detach())
        if kwargs.get("num_items_in_batch") is not None:
            # The model divided by the token count of the whole accumulated batch, so this
            # micro-batch loss is a share of the step's loss: the shares add up to it.
            self._losses_are_shares = True

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._grad_norm = None
        trainer_clips = bool(args.max_grad_norm and args.max_grad_norm > 0)
        if self.optimizer is not None and self.optimizer.config.max_grad_norm is None:
            if not trainer_clips:
                # Nothing clipped, so nothing took the norm: take it here, before the step uses
                # the gradients (max_norm=inf only measures). Read on the host only when logged.
                self._grad_norm = self.optimizer.clip_grad_norm_(math.inf)
            # else Trainer clipped an optimizer whose .grad holds everything (the callback
            # refuses any other at on_train_begin) and logged that norm, taken before its clip:
            # it stays.
        self._feed_loss()

    def _feed_loss(self) -> None:
        if not self.feed_loss or self.optimizer is None:
            return
        if not self._losses:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                logger.warning(
                    "BlockLLMCallback: the model returned no `loss` in this training step (a "
                    "compute_loss_func, label smoothing or tuple outputs), so the loss trigger "
                    "cannot see it. Call unwrap_blockllm(trainer.optimizer).record_loss(loss) in a "
                    "compute_loss override and use BlockLLMCallback(feed_loss=False), or "
                    "trigger='interval'."
                )
            return
        # One device-side reduction and one host sync per optimizer step, not per micro-batch.
        losses = torch.stack([loss.float().reshape(()) for loss in self._losses])
        step_loss = losses.sum() if self._losses_are_shares else losses.mean()
        self._losses.clear()
        self._losses_are_shares = False
        self.optimizer.record_loss(step_loss)

    # -------------------------------------------------------------------------- bookkeeping

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = self.optimizer
        if optimizer is None:
            return
        # After step() and before Trainer's zero_grad: the selected gradients still exist.
        self._memory = optimizer.memory_report()
        # Trainer increments global_step after this event; name the step that just ran.
        step = state.global_step + 1
        if optimizer.num_selections != self._seen_selections:
            logger.info(
                "BlockLLM selected %d tensors (%d of %d coordinates, %.4g trainable) at step %d",
                len(optimizer.selected), optimizer.num_selected, optimizer.budget,
                optimizer.trainable_fraction, step,
            )  # fmt: skip
            self._seen_selections = optimizer.num_selections
        pending = optimizer.selection_pending
        if pending and not self._seen_pending and optimizer.num_selections > 0:
            # The trigger fired: the next backward scores every candidate.
            self.reselection_steps.append(step)
            logger.info("BlockLLM: loss plateau at step %d, reselecting on the next step", step)
        self._seen_pending = pending
        self._losses.clear()  # a skipped pre-step event must not leak losses into the next step

    def _last_step_grad_norm(self) -> float | None:
        """The norm BlockLLM clips against, of the last optimizer step (its clip's or ours)."""
        optimizer = self.optimizer
        if optimizer is None:
            return None
        if optimizer.config.max_grad_norm is not None:
            return optimizer.last_grad_norm
        return None if self._grad_norm is None else float(self._grad_norm)

    def metrics(self) -> dict[str, float]:
        """The ``blockllm/...`` values the callback adds to Trainer's logs, as of now."""
        optimizer = self.optimizer
        if optimizer is None:
            return {}
        values: dict[str, float] = {
            "num_reselections": optimizer.num_reselections,
            "num_selected": optimizer.num_selected,
            "budget": optimizer.budget,
            "trainable_fraction": optimizer.trainable_fraction,
            "selection_seconds": optimizer.selection_seconds,
            "num_skipped_steps": optimizer.num_skipped_steps,
        }
        memory = self._memory or optimizer.memory_report()
        values.update({f"memory/{key}_bytes": value for key, value in memory.items()})
        return {LOG_PREFIX + key: value for key, value in values.items()}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Training logs ("loss") and the end-of-training summary ("train_runtime") only; the
        # optimizer says nothing about an evaluation.
        if logs is None or not ({"loss", "train_runtime"} & logs.keys()):
            return
        extra = self.metrics()
        norm = self._last_step_grad_norm()
        if "loss" in logs and norm is not None:
            # Trainer's own `grad_norm` is torch's norm over `.grad`: only what BlockLLM still
            # holds there (the block's whole tensors), not the gradients compacted or already
            # used by the rest rule in backward. BlockLLM's is the norm it clips against (with a
            # rest rule the whole gradient's, what Trainer reports for AdamW), of the same step.
            extra["grad_norm"] = norm
        logs.update(extra)
        # Trainer.log() appended a copy of `logs` to log_history just before this event; keep
        # the persisted history (trainer_state.json) in step with what is printed.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    # -------------------------------------------------------------------------- resume

    def _check_resumed(self, optimizer: BlockLLM, global_step: int) -> None:
        if optimizer.num_steps == 0:
            logger.warning(
                "BlockLLMCallback: resumed at global step %d without BlockLLM state (the "
                "checkpoint has no optimizer.pt, e.g. save_only_model=True); the selection, "
                "trigger window and visit counts start over",
                global_step,
            )
            return
        # With a rest rule every candidate stays trainable; frozen, only the selection.
        everything = optimizer.selection_pending or optimizer.config.rest != "none"
        expected = set(optimizer.candidate_names if everything else optimizer.selected)
        candidates = set(optimizer.candidate_names)
        wrong = [
            name
            for group in optimizer.param_groups
            for name, param in zip(group["param_names"], group["params"], strict=True)
            if name in candidates and param.requires_grad != (name in expected)
        ]
        if wrong:
            # Something changed requires_grad after Trainer loaded the optimizer state; loading
            # the same state again re-applies BlockLLM's selection through its public API.
            logger.warning(
                "BlockLLMCallback: %d tensors had requires_grad out of step with the restored "
                "selection (e.g. %s); re-applying it",
                len(wrong), wrong[:3],
            )  # fmt: skip
            optimizer.load_state_dict(optimizer.state_dict())
        logger.info(
            "BlockLLM selection restored at global step %d: %d tensors, %d of %d coordinates%s",
            global_step, len(optimizer.selected), optimizer.num_selected, optimizer.budget,
            " (reselection pending)" if optimizer.selection_pending else "",
        )  # fmt: skip


def _check_fits_trainer(optimizer: BlockLLM, args: TrainingArguments) -> None:
    """Refuse what Trainer would silently get wrong (see :func:`_fit_to_trainer`)."""
    if args.max_grad_norm and (optimizer.compact_grads or optimizer.config.rest != "none"):
        raise RuntimeError(
            f"Trainer clips gradients (max_grad_norm={args.max_grad_norm}) with "
            "torch.nn.utils.clip_grad_norm_, which cannot see the gradients this BlockLLM keeps "
            "compacted or has used in backward: give BlockLLM max_grad_norm= and set "
            "TrainingArguments(max_grad_norm=0) (create_blockllm_optimizer does both), or build "
            "it with compact_grads=False and rest='none'"
        )
    rest = optimizer.config.rest != "none" and optimizer.config.rest_in_backward
    if args.gradient_accumulation_steps > 1 and rest:
        raise RuntimeError(
            "Trainer accumulates gradients over "
            f"{args.gradient_accumulation_steps} micro-batches and cannot wrap them in "
            "optimizer.hold_gradients(): build BlockLLM with rest_in_backward=False "
            "(create_blockllm_optimizer does so)"
        )


__all__ = [
    "BlockLLMCallback",
    "checkpointing_mode",
    "create_blockllm_optimizer",
    "prepare_model_for_blockllm",
    "unwrap_blockllm",
]
