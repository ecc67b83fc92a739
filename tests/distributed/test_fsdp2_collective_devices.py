"""Every tensor FSDP2's collectives send is built on a named device.

An NCCL process group (the usual one for FSDP2 on GPUs) reduces CUDA tensors only; a scalar built
with ``torch.tensor(...)`` and no device lands on the CPU and fails there, although gloo (these
tests' backend) takes it. No GPU here to run NCCL, so this reads the code: each tensor
constructor in the FSDP2 modules must say where its tensor lives.
"""

import ast
from pathlib import Path

import pytest

import blockllm.distributed as package

CONSTRUCTORS = {"tensor", "zeros", "ones", "empty", "full", "arange"}
MODULES = sorted(Path(package.__file__).parent.glob("fsdp2*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_each_tensor_constructor_names_its_device(path):
    undeviced = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CONSTRUCTORS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and not any(keyword.arg == "device" for keyword in node.keywords)
        ):
            undeviced.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert not undeviced, undeviced


def test_the_modules_are_found():
    assert {path.name for path in MODULES} >= {"fsdp2.py", "fsdp2_top.py", "fsdp2_state.py"}
