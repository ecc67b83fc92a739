"""`blockllm estimate` through main(): the table, --json, and bad input."""

import json
from pathlib import Path

import pytest

from blockllm.app.cli.main import main

LLAMA_8B = Path(__file__).parents[1] / "planning" / "data" / "llama-8b-config.json"


def test_table_lists_every_default_method(capsys):
    assert main(["estimate", "--model", "tiny", "--batch-size", "16", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 7.36M parameters" in out
    for method in ("adamw", "blockllm", "adamw-8bit", "galore", "lora", "badam", "lisa"):
        assert any(line.startswith(method + " ") for line in out.splitlines()), method
    assert "1.00x" in out and "checkpointed" in out


def test_json_for_a_config_file(capsys):
    code = main([
        "estimate", "--model", str(LLAMA_8B), "--batch-size", "1", "--seq-len", "4096",
        "--precision", "bf16-pure", "--gradient-checkpointing", "--optimizer", "adamw",
        "--optimizer", "blockllm", "--json",
    ])  # fmt: skip
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in plan["methods"]] == ["adamw", "blockllm"]
    assert plan["settings"]["gradient_checkpointing"] is True
    adamw, blockllm = plan["methods"]
    assert adamw["total_bytes"] == sum(
        adamw[key] for key in ("weights_bytes", "gradients_bytes", "optimizer_state_bytes",
                               "master_weights_bytes", "activations_checkpointed_bytes")
    )  # fmt: skip
    assert adamw["ratio_to_adamw"] == 1.0 and blockllm["ratio_to_adamw"] < 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope"], "Invalid model: 'nope'"),
        (["--model", "tiny", "--optimizer", "sgd"], "Invalid optimizer: 'sgd'"),
        (["--model", "tiny", "--sparsity", "1.5"], "Invalid sparsity: 1.5"),
        (["--model", "tiny", "--batch-size", "0"], "Invalid batch_size: 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    base = ["estimate", "--batch-size", "2", "--seq-len", "8"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockllm: error: ") and message in err and "\n" not in err
