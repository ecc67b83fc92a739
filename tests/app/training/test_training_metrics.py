import json

import pytest

from blockllm.app.training.metrics import MetricsWriter, perplexity, read_metrics, truncate_metrics


def test_writes_lines_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, resume_step=None, tensorboard=True)
    for step in (1, 2, 3):
        writer.log({"step": step, "loss": 1.0 / step, "lr": 0.1, "tokens_per_s": 10.0})
    writer.log_scalars(0, {"eval_loss": 2.0})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    pytest.importorskip("tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)))
    writer = MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
    writer.log({"step": 5, "loss": 50})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 50),
    ]


def test_truncated_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert truncate_metrics(path, 10) == 1
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_damaged_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="blockllm run directory"):
        read_metrics("/nonexistent/run")


def test_perplexity_overflow():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == float("inf")
