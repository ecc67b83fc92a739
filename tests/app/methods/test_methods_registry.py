"""The methods registry: every name is accepted, missing peers fail with the install line."""

import sys

import pytest
import torch
from torch import nn

from blockllm.app.cli.main import build_parser, main
from blockllm.app.methods import OPTIMIZERS, get_optimizer_spec
from blockllm.app.methods.peer_packages import REQUIREMENTS, missing_requirement
from blockllm.app.training import RunConfig
from blockllm.app.training.memory import tensor_bytes
from tests.app.tiny import TINY_FLAGS

NAMES = [
    "adamw", "blockllm", "blockllm-0.95", "blockllm-random", "blockllm-novisit", "blockllm-mask",
    "lisa", "badam", "galore", "lora", "adamw-8bit",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_registry_accepts_each_name(name):
    assert name in OPTIMIZERS
    assert RunConfig.create("pretrain", "tiny", optimizer=name).optimizer == name
    args = build_parser().parse_args(["pretrain", "--output-dir", "x", "--optimizer", name])
    assert args.optimizer == name


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "name,expected",
    [("blockllm-0.95", {"sparsity": 0.95}), ("blockllm-random", {"score": "random"}),
     ("blockllm-cyclic", {"score": "cyclic"}), ("blockllm-keep-moments", {"keep_moments": True}),
     ("blockllm-cyclic-keep", {"score": "cyclic", "keep_moments": True}),
     ("blockllm-novisit", {"visit_penalty": False}), ("blockllm-mask", {"selection": "mask"})],
)  # fmt: skip
def test_blockllm_variants_fix_their_setting(name, expected, monkeypatch):
    import blockllm.optim

    seen = {}
    real = blockllm.optim.BlockLLM

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(blockllm.optim, "BlockLLM", spy)
    config = RunConfig.create("pretrain", "tiny", optimizer=name)
    get_optimizer_spec(name).build(_tiny_llama(), config)
    for key, value in expected.items():
        assert seen[key] == value


@pytest.mark.parametrize("name", ["galore", "lora", "badam", "adamw-8bit"])
def test_missing_peer_is_reported_with_the_install_line(name, monkeypatch, tmp_path, cache_dir,
                                                        capsys):  # fmt: skip
    module, pip_line = REQUIREMENTS[name]
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    code = main([
        "pretrain", *TINY_FLAGS, "--optimizer", name, "--max-steps", "1",
        "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir),
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("blockllm: error:")] == [
        f"blockllm: error: --optimizer {name} needs the package {module!r}, install it with:"
    ]
    assert lines[-1] == pip_line


def test_missing_package_lookup(monkeypatch):
    import blockllm.app.methods.peer_packages as peers

    assert missing_requirement("adamw") is None and missing_requirement("lisa") is None
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda module: None)
    assert missing_requirement("galore").splitlines()[-1] == "pip install galore-torch"


class _Holder:
    def __init__(self, tensor):
        self.matrix = tensor


def test_state_tensors_inside_objects_are_counted_once():
    param = nn.Parameter(torch.zeros(4, 4))
    model = nn.Linear(4, 4, bias=False)
    model.weight = param
    optimizer = torch.optim.SGD([param], lr=0.1)
    shared = torch.zeros(8)
    optimizer.state[param] = {"a": torch.zeros(2), "obj": _Holder(torch.zeros(3)),
                              "nested": [shared, shared], "step": 3}  # fmt: skip
    assert tensor_bytes(model, optimizer)["optimizer_state"] == (2 + 3 + 8) * 4
