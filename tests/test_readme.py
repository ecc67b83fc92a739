"""The README's training-loop example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = re.search(
        r"<!-- readme-example:start -->\s*```python\n(.*?)```\s*<!-- readme-example:end -->",
        text,
        re.S,
    )
    assert block, "the README lost its example markers"
    namespace: dict = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    opt = namespace["opt"]
    assert opt.num_selected <= opt.budget
    out = capsys.readouterr().out
    assert "optimizer_state" in out
    # The example shows learning: the printed loss falls a long way, with torch alone.
    losses = [float(value) for value in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 10, out
    assert "transformers" not in block.group(1)
