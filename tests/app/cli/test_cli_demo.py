"""`blockllm demo --quick`: both methods in their own processes, a table, demo.md and demo.png."""

import json

from blockllm.app.cli.main import main


def test_quick_demo(tmp_path, cache_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--cache-dir", str(cache_dir),
                 "--progress", "off", "--threads", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "demo.md").read_text()
    for text in (markdown, printed):
        assert "| adamw | adamw |" in text and "| blockllm | blockllm |" in text
    # Each method ran in its own process with the same data, seed and steps.
    adamw, blockllm = (
        json.loads((out / m / "config.json").read_text()) for m in ("adamw", "blockllm")
    )
    assert {k: v for k, v in adamw.items() if k != "optimizer"} == {
        k: v for k, v in blockllm.items() if k != "optimizer"
    }
    assert json.loads((out / "blockllm" / "summary.json").read_text())["steps"] == 6


def test_demo_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_piped_demo_prints_status_lines_while_a_child_runs(tmp_path, monkeypatch, capsys):
    # Piped (CI logs, `tee`), the children show no bar and log only warnings: the demo itself
    # prints a line from the running child's metrics.jsonl every STATUS_EVERY_S seconds.
    import sys

    from blockllm.app.cli import demo

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert demo.progress_mode("auto") == "log"
    assert demo.progress_mode("off") == "off"
    monkeypatch.setattr(demo, "STATUS_EVERY_S", 0.05)
    metrics_path = tmp_path / "metrics.jsonl"
    child = (
        "import json, time\n"
        "time.sleep(0.5)\n"
        "for step in (1, 2, 3):\n"
        f"    with open({str(metrics_path)!r}, 'a') as handle:\n"
        "        handle.write(json.dumps({'step': step, 'loss': 5.0 - step, 'tokens_per_s': 4100.0,"
        " 'peak_rss_mb': 900.0}) + '\\n')\n"
        "    time.sleep(0.5)\n"
    )
    status = demo.StatusLines("adamw", tmp_path, total=3)
    assert demo._run_child([sys.executable, "-c", child], status) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("    adamw: setting up")
    steps = [line for line in lines if line.startswith("    adamw: step ")]
    assert steps and len(steps) == len(set(steps))  # one line per step reached, no repeats
    assert "step 3/3 | loss 2.0000 | 4,100 tok/s | rss 900 MB" in steps[-1]
