"""benchmarks/seed_comparison.py: the paired figures the benchmark notes quote."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[3] / "benchmarks" / "seed_comparison.py"


@pytest.fixture(scope="module")
def seed_comparison():
    spec = importlib.util.spec_from_file_location("seed_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_folder(root: Path, seed: int, losses: dict[str, list[float]]) -> Path:
    """What `blockllm bench --seeds SEED` writes: the suite's records and each run's metrics."""
    folder = root / f"s{seed}"
    records = []
    for entry, curve in losses.items():
        run = folder / "runs" / f"{entry}-s{seed}"
        run.mkdir(parents=True)
        lines = [{"step": 10 * i, "loss": 9.0, "eval_loss": value} for i, value in enumerate(curve)]
        lines.insert(1, {"step": 5, "loss": 8.0})  # a training line: not an evaluation
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        records.append({"method": run.name, "entry": entry, "seed": seed, "status": "ok",
                        "final_eval_loss": curve[-1]})  # fmt: skip
    (folder / "suite.json").write_text(json.dumps(records))
    (folder / "loss_vs_step.json").write_text(json.dumps({"not": "records"}))
    return folder


def test_pairs_seeds_at_the_end_and_at_every_evaluation(seed_comparison, tmp_path):
    folders = [
        _bench_folder(tmp_path, 0, {"ref": [5.0, 4.0, 3.0], "new": [5.0, 3.9, 2.9]}),
        _bench_folder(tmp_path, 1, {"ref": [5.0, 4.2, 3.2], "new": [5.0, 4.0, 3.0]}),
    ]
    finals, curves = seed_comparison.load(folders)
    assert finals == {"ref": {0: 3.0, 1: 3.2}, "new": {0: 2.9, 1: 3.0}}
    assert curves["new"][1] == {0: 5.0, 10: 4.0, 20: 3.0}
    stats = seed_comparison.paired(finals["new"], finals["ref"])
    assert stats["seeds"] == 2 and stats["mean"] == pytest.approx(-0.15)
    assert stats["sd"] == pytest.approx(math.sqrt(2) * 0.05)  # differences -0.1 and -0.2
    assert stats["t"] == pytest.approx(-0.15 / 0.05)
    assert stats["relative"] == pytest.approx(2.95 / 3.1 - 1)
    gaps = seed_comparison.difference_curve(curves["new"], curves["ref"])
    assert sorted(gaps) == [0, 10, 20] and gaps[0] == [0.0, 0.0]
    assert gaps[10] == pytest.approx([-0.1, -0.2]) and gaps[20] == pytest.approx([-0.1, -0.2])
    text = seed_comparison.report(finals, curves, "ref")
    assert "-0.1500 +- 0.0707 over 2 seeds, t = -3.0, -4.84 %" in text
    assert "-0.1500 [2]" in text
    seed_comparison.draw(curves, "ref", tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_refuses_a_missing_reference_and_disagreeing_records(seed_comparison, tmp_path):
    folder = _bench_folder(tmp_path, 0, {"new": [5.0, 4.0]})
    finals, curves = seed_comparison.load([folder])
    with pytest.raises(ValueError, match="no finished run of the reference entry 'ref'"):
        seed_comparison.report(finals, curves, "ref")
    other = _bench_folder(tmp_path / "again", 0, {"new": [5.0, 4.5]})
    with pytest.raises(ValueError, match="new seed 0: two records disagree"):
        seed_comparison.load([folder, other])
    with pytest.raises(ValueError, match="no `blockllm bench` suite records"):
        seed_comparison.load([tmp_path / "empty"])
