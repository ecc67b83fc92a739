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
