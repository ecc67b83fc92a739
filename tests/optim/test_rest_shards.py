"""The factored rest rule on FSDP2 shards (whole rows per rank), against one process's rule.

The ranks are threads here, their all-reduce a barrier over a shared list, so the arithmetic of
:class:`~blockllm.selection.rest_rules.Shards` is checked to fp32 rounding without processes
(the rule computes in fp32); ``tests/distributed/test_fsdp2.py`` trains under real FSDP2 with it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from blockllm.selection.rest_rules import FactoredRest, Shards


class ThreadRanks:
    """``ranks`` threads that sum tensors over each other, as an all-reduce would."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.parts: list[torch.Tensor | None] = [None] * ranks
        self.calls = [0] * ranks

    def sum_for(self, rank: int):
        def sum_(tensor: torch.Tensor) -> None:
            self.calls[rank] += 1
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack(self.parts).sum(dim=0)
            self.barrier.wait()  # everyone has read every part before the next call writes
            tensor.copy_(total)

        return sum_

    def run(self, work) -> list:
        """``work(rank)`` on every rank at once; their results in rank order."""
        results: list = [None] * len(self.parts)
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank)
            except BaseException as error:  # noqa: BLE001 - reported to the test below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(len(results))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def _split_rows(tensor: torch.Tensor, ranks: int) -> list[torch.Tensor]:
    """Dim-0 chunks as FSDP2 makes them (``torch.chunk``; the last ranks may get fewer rows, or
    none)."""
    chunk = -(-tensor.shape[0] // ranks)
    return [tensor[min(r * chunk, tensor.shape[0]) : (r + 1) * chunk] for r in range(ranks)]


def _sharded_directions(grads, ranks: int, dense: bool):
    """Each step's direction put together from ``ranks`` shards, the per-rank states, and the
    number of collectives each rank made."""
    world = ThreadRanks(ranks)
    rules = [FactoredRest() for _ in range(ranks)]
    pieces = [_split_rows(grad, ranks) for grad in grads]
    states = [rules[r].init_state(pieces[0][r]) for r in range(ranks)]
    shape = grads[0].shape
    rows = shape.numel() // shape[-1] if len(shape) >= 2 else shape.numel()

    def work(rank: int):
        shards = Shards(rows=rows, numel=shape.numel(), sum_=world.sum_for(rank))
        rule = rules[rank]
        state = states[rank]
        out = []
        for step_pieces in pieces:
            piece = step_pieces[rank]
            if dense or piece.dim() < 2:
                out.append(rule.direction(piece, state, shards))
            else:
                prepared = rule.prepare(piece, state, shards)
                rms = prepared.clip_rms
                live = prepared.live_rows()
                written = prepared.dense()
                stepped = torch.zeros_like(piece)
                prepared.apply_(stepped, 1.0)  # in place: weight -= 1.0 * direction
                out.append((written, rms, live, stepped))
        return out

    results = world.run(work)
    return results, states, world.calls


def _gradients(shape, steps=4, scale=1.0):
    torch.manual_seed(0)
    grads = []
    for _ in range(steps):
        grad = torch.randn(shape) * scale
        if len(shape) >= 2:  # rows of very different size, as a vocabulary matrix's
            grad *= torch.logspace(-3, 1, shape[0])[:, None]
        grads.append(grad)
    return grads


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize(("shape", "ranks"), [((61, 12), 2), ((10, 5), 3), ((2, 7), 3), ((37,), 2)])
def test_sharded_factored_direction_is_one_process_direction(shape, ranks, scale):
    # Uneven chunks, and (2 rows over 3 ranks) a rank with no rows at all; a vector too.
    grads = _gradients(shape, scale=scale)
    rule = FactoredRest()
    state = rule.init_state(grads[0])
    expected = [rule.direction(grad, state) for grad in grads]
    results, states, calls = _sharded_directions(grads, ranks, dense=True)
    for step, direction in enumerate(expected):
        together = torch.cat([results[rank][step] for rank in range(ranks)])
        torch.testing.assert_close(together, direction, rtol=1e-5, atol=1e-7)
    assert calls == [len(grads)] * ranks  # one collective per step, on every rank
    if len(shape) >= 2:
        # The row statistics are this rank's rows; the column statistics the same everywhere.
        rows = torch.cat([s["row"] for s in states])
        torch.testing.assert_close(rows, state["row"], rtol=1e-6, atol=0)
        for s in states:
            assert torch.equal(s["col"], states[0]["col"])
            torch.testing.assert_close(s["col"], state["col"], rtol=1e-6, atol=0)


def test_every_way_of_writing_a_sharded_step_shares_its_whole_tensors_clip():
    # The in-place, live-rows and dense forms of one shard's step use the whole tensor's clip
    # (no collective of their own: they may run on one rank and not on another).
    grads = _gradients((40, 9))
    for step, grad in enumerate(grads):
        grad[1::3] = grad[2::3] = 0.0  # two rows in three dead: the live-rows form applies
        grad *= 10.0**step  # growing past the statistics: the direction's RMS exceeds 1
    results, _, calls = _sharded_directions(grads, 2, dense=False)
    assert calls == [len(grads)] * 2
    dense, _, _ = _sharded_directions(grads, 2, dense=True)
    for rank in range(2):
        for step, (written, rms, live, stepped) in enumerate(results[rank]):
            if step:
                assert rms is not None and rms > 1  # clipped by the whole tensor's RMS
            torch.testing.assert_close(written, dense[rank][step], rtol=0, atol=0)
            torch.testing.assert_close(-stepped, written, rtol=1e-6, atol=0)
            rows, values = live
            torch.testing.assert_close(values, written[rows], rtol=1e-6, atol=0)
            dead = torch.ones(written.shape[0], dtype=torch.bool)
            dead[rows] = False
            assert not written[dead].any()


@pytest.mark.parametrize("bad", [0, 2])  # 0: the statistics are still zeros
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("shape", [(12, 5), (13,)])
def test_a_non_finite_shard_stops_the_step_and_the_statistics_everywhere(poison, shape, bad):
    grads = _gradients(shape)
    grads[bad][1] = float(poison)  # rank 0's rows only
    results, states, _ = _sharded_directions(grads, 2, dense=True)
    # The other rank takes a zero step, and no rank's statistics or step counter moves: the
    # step after it is the one a run without the bad step takes.
    assert not results[1][bad].any()
    skipped, skipped_states, _ = _sharded_directions(grads[:bad] + grads[bad + 1 :], 2, dense=True)
    for rank in range(2):
        torch.testing.assert_close(results[rank][bad + 1], skipped[rank][bad], rtol=0, atol=0)
        for key, value in states[rank].items():
            assert torch.equal(value, skipped_states[rank][key]), (rank, key)


@pytest.mark.parametrize(("shape", "ranks"), [((61, 12), 2), ((2, 7), 3)])
def test_the_accelerator_steps_a_shard_in_place_without_host_reads(monkeypatch, shape, ranks):
    # The GPU form of a sharded step (the rule's statistics and clip over the ranks, then the
    # in-place step in slices, clipped by the whole tensor's RMS clamped at 1) reads nothing on
    # the host, and steps each shard by the direction one process's CPU form gives it. A rank
    # with no rows at all takes part too (2 rows over 3 ranks).
    from blockllm.selection import rest_rules
    from tests.optim.test_rest import _refuse_host_reads

    grads = _gradients(shape)  # rows of very different sizes: the clip divides on most steps
    expected, _, _ = _sharded_directions(grads, ranks, dense=True)
    world = ThreadRanks(ranks)
    rules = [FactoredRest() for _ in range(ranks)]
    pieces = [_split_rows(grad, ranks) for grad in grads]
    states = [rules[r].init_state(pieces[0][r]) for r in range(ranks)]
    rows, numel = shape[0], grads[0].numel()

    def work(rank: int):
        shards = Shards(rows=rows, numel=numel, sum_=world.sum_for(rank))
        out = []
        for step_pieces in pieces:
            piece = step_pieces[rank]
            prepared = rules[rank].prepare(piece, states[rank], shards)
            stepped = torch.zeros_like(piece)
            prepared.apply_(stepped, 1.0, finite=torch.isfinite(piece).all())
            out.append(stepped.neg_())
        return out

    monkeypatch.setattr(rest_rules, "_on_accelerator", lambda tensor: True)
    monkeypatch.setattr(rest_rules, "_ACCELERATOR_SLICE_ELEMENTS", 64)  # several slices a shard
    with monkeypatch.context() as reads:
        _refuse_host_reads(reads)
        results = world.run(work)
    monkeypatch.undo()
    assert world.calls == [len(grads)] * ranks
    for step in range(len(grads)):
        together = torch.cat([results[rank][step] for rank in range(ranks)])
        want = torch.cat([expected[rank][step] for rank in range(ranks)])
        assert together.abs().max() > 0
        torch.testing.assert_close(together, want, rtol=1e-5, atol=1e-7)
