"""Lazy optional imports, the optimizer factory and the unwrap helper."""

import subprocess
import sys

import pytest
import torch

from blockllm import BlockLLM
from blockllm.integrations import unwrap_blockllm  # needs neither transformers nor accelerate

_IMPORT_CHECK = """
import sys
import blockllm, blockllm.integrations
assert "transformers" not in sys.modules, "import blockllm.integrations pulled in transformers"
assert "BlockLLMCallback" in dir(blockllm.integrations)
try:
    blockllm.integrations.no_such_name
except AttributeError:
    pass
else:
    raise SystemExit("unknown names must raise AttributeError")
sys.modules["transformers"] = None  # as if it were not installed
try:
    from blockllm.integrations import BlockLLMCallback
except ImportError as err:
    print(err)
else:
    raise SystemExit("expected ImportError")
"""


def test_integrations_import_lazily_and_name_the_install_line():
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'blockllm[hf]'" in done.stdout


def test_param_groups_match_trainer_adamw(make_llama, make_args):
    transformers = pytest.importorskip("transformers")
    from blockllm.integrations import create_blockllm_optimizer

    model = make_llama()
    args = make_args(learning_rate=2e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    args.weight_decay = 0.1
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.9)

    reference = transformers.Trainer(model=model, args=args).create_optimizer()
    expected = [[id(p) for p in group["params"]] for group in reference.param_groups]
    got = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    assert got == expected
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    no_decay = optimizer.param_groups[1]["param_names"]
    assert no_decay and all("norm" in name for name in no_decay)
    for group in optimizer.param_groups:
        assert group["lr"] == 2e-4
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-6
    assert optimizer.sparsity == 0.9


def test_factory_keywords_win_and_frozen_params_stay_out(make_llama, make_args):
    from blockllm.integrations import create_blockllm_optimizer

    model = make_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = create_blockllm_optimizer(model, make_args(), lr=1e-2, weight_decay=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2]
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    assert "model.embed_tokens.weight" not in optimizer.candidate_names


def test_vocab_lr_scale_gives_the_embedding_and_head_a_scheduled_group(make_llama, make_args):
    transformers = pytest.importorskip("transformers")
    from blockllm.integrations import create_blockllm_optimizer

    model = make_llama()
    args = make_args(learning_rate=5e-4, lr_scheduler_type="linear", warmup_steps=2, max_steps=6)
    args.weight_decay = 0.1
    optimizer = create_blockllm_optimizer(model, args, vocab_lr_scale=20)
    vocabulary = {"model.embed_tokens.weight", "lm_head.weight"}
    names = [set(group["param_names"]) for group in optimizer.param_groups]
    assert names[2] == vocabulary and not (names[0] | names[1]) & vocabulary
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4, pytest.approx(1e-2)]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1]
    # Trainer's schedule scales every group alike: the vocabulary keeps its 20x at each step.
    seen = []

    class Rates(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([group["lr"] for group in optimizer.param_groups])

    trainer = transformers.Trainer(model=model, args=args, train_dataset=_tokens(24),
                                   optimizers=(optimizer, None), callbacks=[Rates()])  # fmt: skip
    trainer.train()
    assert len({rates[0] for rates in seen}) > 2  # the schedule moved the lr
    for body, _, vocab in seen:
        assert vocab == pytest.approx(20 * body)


def _tokens(count):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (count, 8), generator=generator)]  # fmt: skip


@pytest.mark.parametrize(
    ("scale", "message"),
    [(0, r"Invalid vocab_lr_scale: 0 \(expected a number > 0, or None\)"),
     (-2.0, r"Invalid vocab_lr_scale: -2.0 \(expected"),
     (float("nan"), r"Invalid vocab_lr_scale: nan \(expected")],
)  # fmt: skip
def test_factory_refuses_a_bad_vocab_lr_scale(make_llama, make_args, scale, message):
    from blockllm.integrations import create_blockllm_optimizer

    with pytest.raises(ValueError, match=message):
        create_blockllm_optimizer(make_llama(), make_args(), vocab_lr_scale=scale)


def test_factory_refuses_a_vocab_lr_scale_with_the_vocabulary_frozen(make_llama, make_args):
    from blockllm.integrations import create_blockllm_optimizer

    model = make_llama()
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Invalid vocab_lr_scale: 20 .*\(none, or frozen\)"):
        create_blockllm_optimizer(model, make_args(), vocab_lr_scale=20)


def test_factory_rejects_bad_arguments(make_llama, make_args):
    from blockllm.integrations import create_blockllm_optimizer

    model = make_llama()
    with pytest.raises(TypeError, match="training_args"):
        create_blockllm_optimizer(model, {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="sparsity"):
        create_blockllm_optimizer(model, make_args(), sparsity=1.5)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        create_blockllm_optimizer(model, make_args())


def test_unwrap_blockllm():
    model = torch.nn.Linear(4, 4)
    optimizer = BlockLLM(model.named_parameters())

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_blockllm(optimizer) is optimizer
    assert unwrap_blockllm(Wrapper(Wrapper(optimizer))) is optimizer
    with pytest.raises(TypeError, match="got AdamW"):
        unwrap_blockllm(torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match="Wrapper wrapping SGD"):
        unwrap_blockllm(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(TypeError, match="got None"):
        unwrap_blockllm(None)


def test_callback_refuses_multi_process_trainer_without_process_group(make_llama):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from blockllm.integrations import BlockLLMCallback

    model = make_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9)
    callback = BlockLLMCallback(opt)
    args = SimpleNamespace(world_size=2)
    with pytest.raises(RuntimeError, match=r"needs process_group=torch\.distributed\.group\.WORLD"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=opt)


def test_trainer_clipping_moves_into_blockllm_and_a_blind_clip_is_refused(make_llama, make_args):
    # Trainer's torch clip cannot see compacted gradients or those a rest rule used in backward.
    transformers = pytest.importorskip("transformers")
    from blockllm.integrations import BlockLLMCallback, create_blockllm_optimizer

    args = make_args(max_grad_norm=0.5)
    optimizer = create_blockllm_optimizer(make_llama(), args, sparsity=0.9, rest="sign")
    assert optimizer.config.max_grad_norm == 0.5 and args.max_grad_norm == 0.0
    accumulating = make_args(gradient_accumulation_steps=2)
    optimizer = create_blockllm_optimizer(make_llama(), accumulating, rest="colnorm")
    assert optimizer.config.rest_in_backward is False

    model = make_llama()
    built_by_hand = BlockLLM(model.named_parameters(), sparsity=0.9)  # compacts by default
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    with pytest.raises(RuntimeError, match=r"max_grad_norm=1\.0\) with torch\.nn\.utils"):
        BlockLLMCallback().on_train_begin(
            make_args(max_grad_norm=1.0), state, control, optimizer=built_by_hand, model=model
        )
    BlockLLMCallback().on_train_begin(
        make_args(max_grad_norm=0.0), state, control, optimizer=built_by_hand, model=model
    )


def test_max_grad_norm_clips_inside_the_step_like_a_call_before_it():
    def run(inside):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, trigger="interval",
                       patience=3, max_grad_norm=0.1 if inside else None)  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        for _ in range(7):
            model(torch.randn(5, 8, generator=generator)).square().mean().backward()
            if not inside:
                opt.clip_grad_norm_(0.1)
            opt.step(loss=1.0)
            opt.zero_grad()
        return model, opt

    (inside, opt), (outside, _) = run(True), run(False)
    assert opt.last_grad_norm > 0.1  # it did clip
    for a, b in zip(inside.parameters(), outside.parameters()):
        assert torch.equal(a, b)
