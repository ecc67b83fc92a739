"""The configuration of one training run: a validated dataclass, its defaults, and JSON round trips.

``RunConfig`` is the single source of truth for a run. The CLI builds its flags from the fields'
``metadata["help"]``, writes the config to ``DIR/config.json``, and on ``--resume`` compares it
with the saved one: fields marked ``resumable`` (where checkpoints go, how often they are written,
the device) may change between the two, and ``max_steps`` may (a run may be trained longer; the
learning-rate schedule is then recomputed for the new total, see :meth:`RunConfig.resume_conflicts`);
every other field changes the numbers and may not.

Fields that only one command reads (``data`` and the corpus settings for pretraining, ``task`` and
the example limits for finetuning) are None in the other command's config, so that a pretraining
run's ``config.json`` does not name a finetuning task it never saw. Older ``config.json`` files,
which held the defaults there, load and compare equal.

Defaults depend on the command and the model (:func:`defaults_for`): pretraining follows the
GaLore recipe (lr 1e-3, linear warmup over 10 % of the steps, cosine decay to 10 %, no weight
decay, BlockLLM sparsity 0.9), finetuning the BlockLLM paper's finetuning setting (sparsity 0.95)
with each packaged model's usual learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockllm.app.training.library_knobs import library_knobs
from blockllm.app.training.run_errors import ConfigError

if TYPE_CHECKING:
    from blockllm.config import BlockLLMConfig

COMMANDS = ("pretrain", "finetune")
PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure")
TASK_KINDS = ("auto", "classification", "causal-lm")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")

#: The BlockLLM knobs a run sets, named as in :class:`blockllm.config.BlockLLMConfig`, which
#: gives each its default, its check and its help; ``RunConfig`` adds nothing to them.
BLOCKLLM_KNOBS = (
    "sparsity", "patience", "trigger", "selection", "max_tensor_share", "partial", "entry_warmup",
    "exclude", "rest", "vocab_rest", "factored_beta2", "rest_lr_scale", "always_adam",
    "moment_dtype", "master_weights",
)  # fmt: skip
#: What a ``config.json`` written before a knob existed meant by leaving it out.
_ABSENT_MEANS = {
    "rest": "none", "vocab_rest": None, "rest_lr_scale": 1.0, "always_adam": None,
    "moment_dtype": "float32", "factored_beta2": 0.999, "master_weights": True,
    "gradient_checkpointing": False,
}  # fmt: skip


def _field(default: Any, help: str, *, resumable: bool = False, command: str | None = None) -> Any:
    """A dataclass field whose help string feeds the CLI and the docs.

    Args:
        default: The dataclass default (:func:`defaults_for` refines it per command and model).
        help: The flag's help text.
        resumable: May change on ``--resume`` (it does not change the numbers).
        command: The one command that reads the field; None in the other command's configs.
    """
    return field(
        default=default, metadata={"help": help, "resumable": resumable, "command": command}
    )


def _knob(name: str) -> Any:
    """A BlockLLM knob: default and help from :class:`BlockLLMConfig` (regexes as strings).

    Read through :mod:`~blockllm.app.training.library_knobs`, which does not import torch, so
    that the command line can build its flags and answer ``--help`` quickly.
    """
    knob = library_knobs()[name]
    return _field(knob.default, "BlockLLM: " + knob.help)


@dataclass
class RunConfig:
    """Everything that decides what a training run computes, plus where it writes.

    Build one with :meth:`create` (command- and model-specific defaults, then overrides) or
    :meth:`from_dict`; both validate. Fields are plain JSON values so ``config.json`` is readable
    and diffable.
    """

    command: str = _field("pretrain", "pretrain or finetune")
    model: str = _field("tiny", "model preset (pretrain) or finetune model name/path")
    data: str | None = _field(
        "stdlib", "pretraining text: 'stdlib', a .txt/.jsonl path, or a HF dataset",
        command="pretrain",
    )  # fmt: skip
    task: str | None = _field(
        "tweet-sentiment", "finetuning task name or a .jsonl path", command="finetune"
    )
    task_kind: str | None = _field(
        "auto", "finetune head: classification, causal-lm (text-to-label), or auto from the model",
        command="finetune",
    )  # fmt: skip
    optimizer: str = _field(
        "blockllm", "optimizer name, registered in blockllm.app.methods (the CLI lists them)"
    )
    max_steps: int = _field(1000, "optimizer steps to train")
    batch_size: int = _field(16, "sequences per micro-batch")
    grad_accum: int = _field(1, "micro-batches accumulated per optimizer step")
    seq_len: int = _field(128, "tokens per sequence (finetune: maximum length, longer is cut)")
    lr: float = _field(1e-3, "peak learning rate")
    vocab_lr_scale: float = _field(
        1.0, "learning rate of the embedding and head matrices as a multiple of --lr (a param "
        "group of their own, scheduled like the rest); 1 = the same lr as every other tensor"
    )
    min_lr_ratio: float = _field(0.1, "final learning rate as a fraction of the peak (cosine end)")
    warmup_steps: int = _field(-1, "linear warmup steps; -1 = 10% of max-steps")
    weight_decay: float = _field(0.0, "decoupled weight decay on matrices (not on norms/biases)")
    beta1: float = _field(0.9, "Adam beta1")
    beta2: float = _field(0.999, "Adam beta2")
    eps: float = _field(1e-8, "Adam epsilon")
    grad_clip: float = _field(1.0, "clip the gradient norm to this; 0 = no clipping")
    precision: str = _field(
        "auto", "fp32; bf16 (autocast over fp32 weights); bf16-pure (weights stored in bf16, fp32 "
        "master copies and moments for BlockLLM's selected coordinates only; BlockLLM methods "
        "only); or auto = bf16 on a CUDA GPU that has it"
    )
    gradient_checkpointing: bool = _field(
        False,
        "activation checkpointing: keep only each layer's input and recompute the rest in the "
        "backward (transformers' own, non-reentrant): less activation memory, slower steps, the "
        "same numbers; may change on --resume",
        resumable=True,
    )
    sparsity: float = _knob("sparsity")
    patience: int = _knob("patience")
    trigger: str = _knob("trigger")
    selection: str = _knob("selection")
    max_tensor_share: float = _knob("max_tensor_share")
    partial: str = _knob("partial")
    entry_warmup: int = _knob("entry_warmup")
    exclude: str | None = _knob("exclude")
    rest: str = _knob("rest")
    vocab_rest: str | None = _knob("vocab_rest")
    factored_beta2: float = _knob("factored_beta2")
    rest_lr_scale: float = _knob("rest_lr_scale")
    always_adam: str | None = _knob("always_adam")
    moment_dtype: str = _knob("moment_dtype")
    master_weights: bool = _knob("master_weights")
    eval_every: int = _field(100, "evaluate every N steps (and at the end); 0 = only at the end")
    eval_batches: int | None = _field(
        20, "eval batches per evaluation (pretrain); 0 = the whole eval split", command="pretrain"
    )
    eval_at_start: bool = _field(
        False, "also evaluate before the first step (the untrained baseline)"
    )
    save_every: int = _field(
        200,
        "checkpoint every N steps (and at the end); 0 = only at the end; -1 = never (a "
        "SIGINT/SIGTERM/SIGHUP still saves one)",
        resumable=True,
    )
    keep_checkpoints: int = _field(2, "how many recent checkpoints to keep", resumable=True)
    log_every: int = _field(1, "write a metrics line every N steps")
    seed: int = _field(0, "seed of the model init, data order and dropout")
    device: str = _field("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)", resumable=True)
    vocab_size: int | None = _field(
        8192, "pretrain: size of the byte-level BPE trained on the corpus", command="pretrain"
    )
    max_chars: int | None = _field(
        None, "pretrain: read at most this many characters of the corpus", command="pretrain"
    )
    max_tokens: int | None = _field(
        None, "pretrain: keep at most this many tokens", command="pretrain"
    )
    eval_fraction: float | None = _field(
        0.05, "pretrain: fraction of blocks held out for evaluation", command="pretrain"
    )
    max_train_examples: int | None = _field(
        None, "finetune: use at most this many training examples", command="finetune"
    )
    max_eval_examples: int | None = _field(
        None, "finetune: use at most this many held-out examples", command="finetune"
    )
    tensorboard: bool = _field(True, "write TensorBoard event files", resumable=True)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            # A field the other command reads means nothing here; None says so in config.json.
            # Normalising (not refusing) keeps older config.json files loading: they held the
            # dataclass defaults there, and now compare equal to a new config of the same run.
            if item.metadata.get("command") not in (None, self.command):
                setattr(self, item.name, None)
        if self.exclude == "":
            self.exclude = None  # `--exclude ""` switches a model's default exclusion off
        if self.always_adam == "":
            self.always_adam = None
        self.validate()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, command: str, model: str | None = None, **overrides: Any) -> RunConfig:
        """Defaults for ``command`` and ``model`` (see :func:`defaults_for`), then ``overrides``.

        Raises:
            ConfigError: an unknown name or a bad value.
            TypeError: an unknown field, listing the valid ones.
        """
        _check_keys(overrides)
        values = defaults_for(command, model)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a dict such as ``config.json``'s; unknown keys raise ``TypeError``."""
        if not isinstance(values, dict):
            raise TypeError(f"Invalid config: expected a JSON object, got {type(values).__name__}")
        _check_keys(values)
        return cls(**{**_ABSENT_MEANS, **values})

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """Read ``config.json``.

        Raises:
            ConfigError: the file is not valid JSON or holds an invalid config.
        """
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(values)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid blockllm run config ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with ``changes`` applied."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ comparison

    def differences(self, other: RunConfig, *, include_resumable: bool = False) -> dict[str, tuple]:
        """Fields whose values differ, as ``{name: (self_value, other_value)}``.

        Args:
            other: The config to compare with (e.g. the one saved in ``config.json``).
            include_resumable: Also report fields that may change on resume.
        """
        diff = {}
        for item in dataclasses.fields(self):
            if item.metadata.get("resumable") and not include_resumable:
                continue
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if mine != theirs:
                diff[item.name] = (mine, theirs)
        return diff

    def resume_conflicts(self, saved: RunConfig) -> dict[str, tuple]:
        """What ``--resume`` with this config may not change in a run saved with ``saved``.

        Every field that changes the numbers, except ``max_steps``: a finished run may be trained
        longer (or an unfinished one stopped earlier, not before its checkpoint's step, which
        the training run checks). The learning-rate schedule is a function of ``max_steps``; it
        is recomputed for the new total from the checkpoint's step on, so the resumed steps use
        the learning rates a run started with the new ``max_steps`` would use there (after a
        finished cosine decay the learning rate therefore rises again), and the run logs that.
        """
        conflicts = self.differences(saved)
        conflicts.pop("max_steps", None)
        return conflicts

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_warmup_steps(self) -> int:
        """``warmup_steps``, with -1 meaning 10 % of ``max_steps`` (the GaLore recipe)."""
        if self.warmup_steps >= 0:
            return min(self.warmup_steps, self.max_steps)
        return int(0.1 * self.max_steps)

    def vocab_lr(self) -> float | None:
        """The embedding and head matrices' own peak lr, or None where they share ``lr``."""
        return None if self.vocab_lr_scale == 1.0 else self.lr * self.vocab_lr_scale

    def blockllm_config(self) -> BlockLLMConfig:
        """The BlockLLM knobs of this run (the run's seed seeds the optimizer's generator)."""
        from blockllm.config import BlockLLMConfig  # loads torch: not at import (see _knob)

        knobs = {name: getattr(self, name) for name in BLOCKLLM_KNOBS}
        return BlockLLMConfig(**knobs, seed=self.seed)

    @property
    def tokens_per_step_hint(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every field; raise on the first bad one.

        Raises:
            ConfigError: an unknown name (the message lists the valid ones) or a bad value.
        """
        _choice("command", self.command, COMMANDS)
        if self.task_kind is not None:
            _choice("task_kind", self.task_kind, TASK_KINDS)
        _choice("precision", self.precision, PRECISIONS)
        for name in ("exclude", "always_adam"):  # a run config holds regexes, not lists
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"Invalid {name}: {value!r} (expected a regex string)")
        try:  # the library's own checks, one per knob
            self.blockllm_config()
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from exc
        from blockllm.app.methods import OPTIMIZERS

        _choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"Invalid device: {self.device!r} (choose from 'auto', 'cpu', 'cuda', 'cuda:N', 'mps')"
            )
        for name in ("data", "task", "model"):
            if getattr(self, name) is None and name != "model":
                continue  # the other command's field
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(
                    f"Invalid {name}: {getattr(self, name)!r} (expected a non-empty string)"
                )

        _int("max_steps", self.max_steps, 1)
        _int("batch_size", self.batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        _int("seq_len", self.seq_len, 2)
        _int("warmup_steps", self.warmup_steps, -1)
        _int("eval_every", self.eval_every, 0)
        _int("save_every", self.save_every, -1)  # -1: no checkpoints (benchmark children)
        _int("keep_checkpoints", self.keep_checkpoints, 1)
        _int("log_every", self.log_every, 1)
        _int("seed", self.seed, 0)
        if self.command == "pretrain":
            _int("eval_batches", self.eval_batches, 0)
            _int("vocab_size", self.vocab_size, 260)  # 256 bytes plus the special tokens
        for name in ("max_chars", "max_tokens", "max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        for name in ("eval_at_start", "tensorboard", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"Invalid {name}: {getattr(self, name)!r} (expected true or false)"
                )

        # lr 0 is valid arithmetic but trains nothing: a run that "succeeds" with the weights it
        # started from is always a mistake (a typo, a bad sweep value), so it is refused.
        _float("lr", self.lr, 0.0, None, lower_open=True)
        _float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float("vocab_lr_scale", self.vocab_lr_scale, 0.0, None, lower_open=True)
        _float("weight_decay", self.weight_decay, 0.0, None)
        _float("beta1", self.beta1, 0.0, 1.0, upper_open=True)
        _float("beta2", self.beta2, 0.0, 1.0, upper_open=True)
        _float("eps", self.eps, 0.0, None)
        _float("grad_clip", self.grad_clip, 0.0, None)
        if self.command == "pretrain":
            _float("eval_fraction", self.eval_fraction, 0.0, 1.0, upper_open=True)
            if self.eval_fraction == 0.0:
                raise ConfigError(
                    "Invalid eval_fraction: 0.0 (must be above 0: evaluation needs data)"
                )

        if self.command == "pretrain":
            from blockllm.app.models.presets import PRESETS

            _choice("model", self.model, tuple(PRESETS), what="preset")
        else:
            from blockllm.app.models.pretrained import FINETUNE_MODELS

            if self.model not in FINETUNE_MODELS and not Path(self.model).expanduser().is_dir():
                listed = ", ".join(repr(name) for name in FINETUNE_MODELS)
                raise ConfigError(
                    f"Invalid model: {self.model!r} (choose from {listed}, or give the path of a "
                    "saved Hugging Face model directory)"
                )
            from blockllm.app.data.tasks import TASKS

            if self.task not in TASKS and not self.task.endswith(".jsonl"):
                listed = ", ".join(repr(name) for name in TASKS)
                raise ConfigError(
                    f"Invalid task: {self.task!r} (choose from {listed}, or give a .jsonl file "
                    'with "text" and "label" fields)'
                )


# ---------------------------------------------------------------------- defaults

# Field values that differ from the dataclass defaults, by command and then by model. The GaLore
# presets default to GaLore's sequence length and a T5-sized vocabulary; batch sizes are what a
# single GPU holds, and --grad-accum reaches GaLore's 512-sequence batches when wanted.
_PRETRAIN_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "llama-20m": {"seq_len": 256, "vocab_size": 32000, "batch_size": 32, "max_steps": 10000,
                  "eval_every": 500, "save_every": 1000},
    "llama-60m": {"seq_len": 256, "vocab_size": 32000, "batch_size": 32, "max_steps": 10000,
                  "eval_every": 500, "save_every": 1000},
    "llama-130m": {"seq_len": 256, "vocab_size": 32000, "batch_size": 32, "max_steps": 20000,
                   "eval_every": 1000, "save_every": 1000},
    "llama-350m": {"seq_len": 256, "vocab_size": 32000, "batch_size": 32, "max_steps": 60000,
                   "eval_every": 1000, "save_every": 2000},
    "llama-1b": {"seq_len": 256, "vocab_size": 32000, "batch_size": 16, "max_steps": 100000,
                 "eval_every": 1000, "save_every": 2000},
}  # fmt: skip

_FINETUNE_DEFAULTS: dict[str, Any] = {
    # A model given by path gets these; the packaged models refine them below.
    "lr": 2e-5,
    "batch_size": 16,
    "seq_len": 128,
    "max_steps": 200,
    "sparsity": 0.95,  # the paper's finetuning sparsity
    "patience": 50,
    "eval_every": 50,
    "eval_at_start": True,  # the untrained baseline is the number finetuning must beat
    "save_every": 100,
    "weight_decay": 0.0,
}

_FINETUNE_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # MiniLM-L6 classifier: the sentence-transformers finetuning lr; tweets fit in 64 tokens.
    "minilm": {"lr": 5e-5, "batch_size": 32, "seq_len": 64, "max_steps": 200},
    # Gemma-3-270M text-to-label: small batches. Its tied 262k x 640 embedding is 63 % of the
    # model: left selectable, it wins the first selection, and updating a slice of it still needs
    # its whole dense gradient (671 MB), so BlockLLM leaves it frozen here, as LoRA would.
    "gemma-270m": {
        "lr": 2e-5,
        "batch_size": 4,
        "seq_len": 64,
        "max_steps": 50,
        "eval_every": 25,
        "exclude": r".*embed_tokens\.weight",
    },
}


def defaults_for(command: str, model: str | None = None) -> dict[str, Any]:
    """Default field values for ``command`` (and ``model``), as a dict of every field.

    Raises:
        ConfigError: ``command`` is unknown.
    """
    _choice("command", command, COMMANDS)
    values = {item.name: item.default for item in dataclasses.fields(RunConfig)}
    values["command"] = command
    if command == "pretrain":
        model = model or "tiny"
        values.update(_PRETRAIN_MODEL_DEFAULTS.get(model, {}))
    else:
        model = model or "minilm"
        values.update(_FINETUNE_DEFAULTS)
        values.update(_FINETUNE_MODEL_DEFAULTS.get(model, {}))
    values["model"] = model
    return values


def field_help(name: str) -> str:
    """The help string of a ``RunConfig`` field (for the CLI)."""
    return RunConfig.__dataclass_fields__[name].metadata["help"]


def _check_keys(values: dict[str, Any]) -> None:
    valid = [item.name for item in dataclasses.fields(RunConfig)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"Unknown config keys {unknown} (valid keys: {', '.join(valid)})")


def _choice(name: str, value: Any, choices: tuple[str, ...], *, what: str | None = None) -> None:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ConfigError(f"Invalid {what or name}: {value!r} (choose from {listed})")


def _int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"Invalid {name}: {value!r} (expected an integer)")
    if value < minimum:
        raise ConfigError(f"Invalid {name}: {value} (must be >= {minimum})")


def _float(
    name: str,
    value: Any,
    low: float,
    high: float | None,
    *,
    lower_open: bool = False,
    upper_open: bool = False,
) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"Invalid {name}: {value!r} (expected a number)")
    if math.isnan(value) or math.isinf(value) or value < low or (lower_open and value == low):
        raise ConfigError(f"Invalid {name}: {value} (must be {'>' if lower_open else '>='} {low})")
    if high is not None and (value > high or (upper_open and value == high)):
        bound = f"< {high}" if upper_open else f"<= {high}"
        raise ConfigError(f"Invalid {name}: {value} (must be {bound})")


__all__ = ["COMMANDS", "PRECISIONS", "TASK_KINDS", "RunConfig", "defaults_for", "field_help"]
