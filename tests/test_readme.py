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
    assert "optimizer_state" in capsys.readouterr().out
