"""build_lm_splits and batch_for_step: packing, the split, and reproducible sharded batches."""

import pytest
import torch

from blockllm.app.data import LMSplits, batch_for_step, build_lm_splits


class CountingTokenizer:
    """Document "n" encodes to the ten ids 10n+1 .. 10n+10, so every position is unique."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [list(range(10 * int(t) + 1, 10 * int(t) + 11)) for t in texts]}


def _docs(n):
    return [str(i) for i in range(n)]


def _rows(tensor):
    return {tuple(row.tolist()) for row in tensor}


def test_packing_appends_eos_and_drops_the_tail():
    splits = build_lm_splits(_docs(30), CountingTokenizer(), seq_len=7, eval_fraction=0.1)
    stream = torch.cat(
        [torch.tensor(list(range(10 * i + 1, 10 * i + 11)) + [0]) for i in range(30)]
    )
    blocks = stream[: (330 // 8) * 8].view(-1, 8)
    assert isinstance(splits, LMSplits)
    assert splits.train.dtype == splits.eval.dtype == torch.int64
    assert splits.train.shape[1] == splits.eval.shape[1] == 8
    assert len(splits.train) + len(splits.eval) == len(blocks) == 41
    assert len(splits.eval) == 4  # round(0.1 * 41)
    # Disjoint, and together exactly the packed blocks.
    assert not _rows(splits.train) & _rows(splits.eval)
    assert _rows(splits.train) | _rows(splits.eval) == _rows(blocks)


def test_split_is_deterministic_and_seeded():
    tok = CountingTokenizer()
    a = build_lm_splits(_docs(50), tok, seq_len=9, seed=3)
    b = build_lm_splits(_docs(50), tok, seq_len=9, seed=3)
    c = build_lm_splits(_docs(50), tok, seq_len=9, seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.eval, c.eval)


def test_at_least_one_eval_block_and_max_tokens():
    splits = build_lm_splits(
        _docs(10), CountingTokenizer(), seq_len=9, eval_fraction=0.01, max_tokens=40
    )
    assert len(splits.eval) == 1 and len(splits.train) == 3


def test_too_little_text_raises():
    with pytest.raises(ValueError, match="fewer than the 2 blocks"):
        build_lm_splits(_docs(1), CountingTokenizer(), seq_len=10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 0}, ValueError, "seq_len: 0"),
        ({"seq_len": 8, "eval_fraction": 1.0}, ValueError, "eval_fraction: 1.0"),
        ({"seq_len": 8, "eval_fraction": 0}, ValueError, "eval_fraction"),
        ({"seq_len": 8, "max_tokens": 1}, ValueError, "max_tokens: 1"),
        ({"seq_len": "8"}, TypeError, "seq_len"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_lm_splits(_docs(5), CountingTokenizer(), **kwargs)


def test_tokenizer_without_eos_is_rejected():
    tok = CountingTokenizer()
    tok.eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id"):
        build_lm_splits(_docs(5), tok, seq_len=4)


def test_real_tokenizer_blocks(stdlib_slice, small_tokenizer):
    splits = build_lm_splits(stdlib_slice, small_tokenizer, seq_len=64, seed=0)
    assert splits.train.shape[1] == 65 and len(splits.eval) >= 1
    assert splits.train.max() < len(small_tokenizer)
    assert (splits.train == small_tokenizer.eos_token_id).any()


# --- batch_for_step ------------------------------------------------------------------------------


def _blocks(n, width=3):
    # Row i is filled with i, so a batch's first column names its blocks.
    return torch.arange(n).unsqueeze(1).expand(n, width).contiguous()


def _ids(batch):
    return batch[:, 0].tolist()


def test_batch_is_a_pure_function_of_its_arguments():
    blocks = _blocks(40)
    forward = [_ids(batch_for_step(blocks, s, 4, seed=7)) for s in range(25)]
    backward = [_ids(batch_for_step(blocks, s, 4, seed=7)) for s in reversed(range(25))][::-1]
    assert forward == backward
    # Resuming at step 13 gives exactly what the uninterrupted run saw from step 13 on.
    assert [_ids(batch_for_step(blocks, s, 4, seed=7)) for s in range(13, 25)] == forward[13:]
    assert _ids(batch_for_step(blocks, 0, 4, seed=8)) != forward[0]


def test_every_block_once_per_epoch_and_epochs_reshuffle():
    blocks = _blocks(24)
    epochs = []
    for epoch in range(3):
        seen = [
            i for s in range(epoch * 6, epoch * 6 + 6) for i in _ids(batch_for_step(blocks, s, 4))
        ]
        assert sorted(seen) == list(range(24))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]


def test_incomplete_last_batch_is_skipped():
    blocks = _blocks(10)
    seen = [i for s in range(3) for i in _ids(batch_for_step(blocks, s, 3))]
    assert len(set(seen)) == 9
    # Step 3 already starts epoch 1.
    assert _ids(batch_for_step(blocks, 3, 3)) == _ids(batch_for_step(blocks, 0, 3, seed=1))


def test_ranks_get_disjoint_shards_of_the_global_batch():
    blocks = _blocks(48)
    world = 3
    for step in range(8):  # two epochs of 4 steps
        shards = [
            _ids(batch_for_step(blocks, step, 4, rank=r, world_size=world)) for r in range(world)
        ]
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == 12
    per_epoch = [
        i
        for step in range(4)
        for r in range(world)
        for i in _ids(batch_for_step(blocks, step, 4, rank=r, world_size=world))
    ]
    assert sorted(per_epoch) == list(range(48))


def test_batch_is_a_copy():
    blocks = _blocks(8)
    batch = batch_for_step(blocks, 0, 2)
    batch.fill_(-1)
    assert (blocks >= 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1, "batch_size": 2}, ValueError, "step: -1"),
        ({"step": 0, "batch_size": 0}, ValueError, "batch_size: 0"),
        ({"step": 0, "batch_size": 11}, ValueError, "only 10 blocks"),
        ({"step": 0, "batch_size": 3, "world_size": 4}, ValueError, "only 10 blocks"),
        ({"step": 0, "batch_size": 2, "rank": 2, "world_size": 2}, ValueError, "rank: 2"),
        ({"step": 0.5, "batch_size": 2}, TypeError, "step"),
    ],
)
def test_batch_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        batch_for_step(_blocks(10), **kwargs)
