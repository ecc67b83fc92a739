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
        (["--model", "tiny", "--fit", "0"], "Invalid fit: 0.0 GB (must be > 0)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    base = ["estimate", "--batch-size", "2", "--seq-len", "8"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockllm: error: ") and message in err and "\n" not in err


def test_fit_without_a_batch_size_prints_each_methods_largest_batch(capsys):
    argv = ["estimate", "--model", "tiny", "--seq-len", "128", "--fit", "1", "--optimizer",
            "adamw", "blockllm"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch of 128-token sequences within 1 GB" in out
    assert "vs AdamW" not in out  # no batch size: no table
    assert main([*argv, "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert fit["budget_bytes"] == 10**9 and fit["seq_len"] == 128
    adamw, blockllm = fit["largest_batch"]["adamw"], fit["largest_batch"]["blockllm"]
    assert 0 < adamw < blockllm  # less state: room for more sequences
    assert f"  blockllm  {blockllm} ({blockllm * 128:,} tokens)" in out


def test_fit_needs_a_batch_size_or_a_budget(capsys):
    assert main(["estimate", "--model", "tiny", "--seq-len", "128"]) == 2
    assert "Invalid arguments: give --batch-size, --fit GB, or both" in capsys.readouterr().err
