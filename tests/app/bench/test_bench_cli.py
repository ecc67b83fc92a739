"""``blockllm bench`` end to end on a few steps: records, table and plots."""

import json

import pytest

from blockllm.app.bench.records import markdown_table
from blockllm.app.bench.runner import git_commit
from blockllm.app.cli.main import main

REQUIRED = {
    "method", "peak_rss_bytes", "baseline_rss_bytes", "training_memory_bytes",
    "training_state_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes", "tokens_per_s",
    "final_eval_loss", "num_reselections", "trainable_fraction", "selection_time_fraction",
    "torch_version", "cpu", "threads", "seed", "git_commit",
}  # fmt: skip


def test_bench_quick_end_to_end(tmp_path, cache_dir, monkeypatch, capsys):
    import blockllm.app.bench.runner as runner
    import blockllm.app.methods.peer_packages as peers

    monkeypatch.setattr(runner, "STATUS_EVERY_S", 0.2)  # --progress off: no status lines at all
    real = peers.importlib.util.find_spec
    # galore "is not installed": the bench must skip it with the install line, not crash.
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda m: None if m == "galore_torch" else real(m)
    )
    out = tmp_path / "bench"
    code = main([
        "bench", "--suite", "quick", "--output-dir", str(out), "--methods",
        "adamw,blockllm,lisa,galore", "--steps", "2", "--threads", "1",
        "--cache-dir", str(cache_dir), "--progress", "off",
    ])  # fmt: skip
    assert code == 0
    records = json.loads((out / "quick.json").read_text())
    assert [r["method"] for r in records] == ["adamw", "blockllm", "lisa", "galore"]
    for record in records[:3]:
        assert record["status"] == "ok"
        assert REQUIRED <= set(record)
        assert record["peak_rss_bytes"] >= record["baseline_rss_bytes"] > 0
        assert record["training_state_bytes"] == (
            record["param_bytes"] + record["grad_bytes"] + record["optimizer_state_bytes"]
            + record["master_weight_bytes"]
        )  # fmt: skip
    adamw, blockllm, lisa = records[:3]
    assert blockllm["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert lisa["trainable_fraction"] < 1.0 and adamw["trainable_fraction"] == 1.0
    assert blockllm["selection_time_fraction"] is not None
    assert records[3]["status"] == "skipped"
    assert records[3]["reason"].splitlines()[-1] == "pip install galore-torch"
    table = (out / "quick.md").read_text()
    assert "| blockllm |" in table and "×)" in table and "pip install galore-torch" in table
    for name in ("loss_vs_step.png", "loss_vs_time.png", "memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "skipped" in printed
    assert ": setting up" not in printed and ": step " not in printed


def test_bench_refuses_unknown_methods_and_used_directories(tmp_path, capsys):
    assert main(["bench", "--output-dir", str(tmp_path / "a"), "--methods", "adamw,nope"]) == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    assert main(["bench", "--output-dir", str(tmp_path / "b")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_markdown_table_ratios_to_adamw():
    base = {"method": "adamw", "status": "ok", "peak_rss_bytes": 2e8, "tokens_per_s": 100.0,
            "final_eval_loss": 5.0}  # fmt: skip
    other = {"method": "x", "status": "ok", "peak_rss_bytes": 1e8, "tokens_per_s": 150.0,
             "final_eval_loss": 5.5}  # fmt: skip
    table = markdown_table([base, other])
    assert "100.0 MB (0.50×)" in table and "150 (1.50×)" in table and "(+0.5000)" in table


@pytest.mark.parametrize("packed", [False, True])
def test_git_commit_is_read_without_git(tmp_path, packed):
    sha = "a" * 40
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    if packed:
        (git / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    else:
        (git / "refs" / "heads" / "main").write_text(sha + "\n")
    (tmp_path / "src").mkdir()
    assert git_commit(tmp_path / "src" / "file.py") == sha
    assert git_commit(tmp_path.parent / "elsewhere") in (None, git_commit())


def test_seed_table_gives_mean_spread_and_ratios_to_the_best_reference_entry():
    from blockllm.app.bench.records import seed_table

    def record(entry, seed, loss, state, speed, optimizer):
        return {"method": f"{entry}-s{seed}", "entry": entry, "status": "ok",
                "final_eval_loss": loss, "training_state_bytes": state, "tokens_per_s": speed,
                "optimizer": optimizer}  # fmt: skip

    records = [
        record("adamw-lr1e-3", 0, 4.0, 100.0, 10.0, "adamw"),
        record("adamw-lr1e-3", 1, 4.2, 100.0, 10.0, "adamw"),
        record("adamw-lr3e-3", 0, 4.5, 100.0, 10.0, "adamw"),
        record("blockllm", 0, 4.2, 35.0, 12.0, "blockllm"),
        record("blockllm", 1, 4.4, 35.0, 12.0, "blockllm"),
        {"method": "blockllm-s2", "entry": "blockllm", "status": "failed"},
    ]
    table = seed_table(records)
    assert "| adamw-lr1e-3 (reference) | 2 | 4.1000 | 4.0000-4.2000 | 0.1414 |" in table
    assert "| blockllm | 2 | 4.3000 | 4.2000-4.4000 | 0.1414 | +0.2000 (+4.9%) | 0.35 | 1.20 |" in table


def test_bench_runs_each_method_once_per_seed(tmp_path, cache_dir, monkeypatch, capsys):
    import blockllm.app.bench.runner as runner

    # Status lines from each child's metrics while it runs (a bench child's own output goes
    # to its stderr file): every 0.2 s here, so that a run of one step shows some.
    monkeypatch.setattr(runner, "STATUS_EVERY_S", 0.2)
    out = tmp_path / "bench"
    code = main([
        "bench", "--suite", "quick", "--output-dir", str(out), "--methods", "blockllm",
        "--steps", "1", "--threads", "1", "--seeds", "0,1", "--cache-dir", str(cache_dir),
    ])  # fmt: skip
    assert code == 0
    records = json.loads((out / "quick.json").read_text())
    assert [(r["method"], r["entry"], r["seed"]) for r in records] == [
        ("blockllm-s0", "blockllm", 0), ("blockllm-s1", "blockllm", 1),
    ]  # fmt: skip
    assert records[0]["final_eval_loss"] != records[1]["final_eval_loss"]  # other init and data
    assert "| blockllm | 2 |" in (out / "quick.md").read_text()
    printed = capsys.readouterr().out
    assert "    blockllm-s0: setting up" in printed and "    blockllm-s1: setting up" in printed
    assert main(["bench", "--output-dir", str(tmp_path / "x"), "--seeds", "a,b"]) == 2
