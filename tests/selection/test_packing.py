"""Budget packers and the fast top-coordinates routine."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockllm.selection.packing import PaperMaskPacker, WholeTensorPacker, top_coordinates, top_rows


def test_top_coordinates_matches_topk_on_large_inputs():
    generator = torch.Generator().manual_seed(0)
    for total, count in [(1_000_000, 1), (1_000_000, 123_457), (1_000_000, 999_999), (300_000, 150_000)]:
        values = torch.randn(total, generator=generator).abs()
        ours = top_coordinates(values, count)
        reference = torch.topk(values, count).indices.sort().values
        assert torch.equal(ours, reference)
        assert torch.all(ours[1:] > ours[:-1])


def test_top_coordinates_falls_back_when_the_sample_misleads():
    # The strided sample sees only zeros; the large values sit between the sampled positions.
    values = torch.zeros(1_000_000)
    values[1::7] = torch.arange(1, len(values[1::7]) + 1, dtype=torch.float32)
    ours = top_coordinates(values, 5000)
    assert torch.equal(ours, torch.topk(values, 5000).indices.sort().values)


def stream_scores(packer, scores, order):
    """Feed ``scores`` to ``packer`` one at a time in ``order``, as gradients arrive in a backward;
    assert that no tensor the plan dropped is ever needed again; return the final plan."""
    seen: dict[int, float] = {}
    dropped: set[int] = set()
    for index in order:
        seen[index] = scores[index]
        members = packer.plan(seen).members
        assert not (members & dropped)
        dropped |= set(seen) - members
    return packer.plan(seen)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=12),
    budget=st.integers(min_value=1, max_value=200),
    data=st.data(),
)
def test_plans_are_monotone_as_scores_stream_in(sizes, budget, data):
    """A tensor excluded from a plan built on part of the scores is never needed later."""
    scores = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(sizes), max_size=len(sizes)))
    order = data.draw(st.permutations(range(len(sizes))))
    for packer in (WholeTensorPacker(sizes, budget), PaperMaskPacker(sizes, budget)):
        final = stream_scores(packer, scores, order)
        used = sum(sizes[i] for i in final.whole)
        assert used <= budget
        if isinstance(packer, WholeTensorPacker):
            assert used + final.remainder == budget
            # the partly selected tensor is the first in score order that did not fit
            if final.partial:
                assert sizes[final.partial[0]] > final.remainder


def test_whole_tensor_packer_uses_the_whole_budget():
    sizes = [100, 30, 15, 5]
    packer = WholeTensorPacker(sizes, budget=50)
    plan = packer.plan({0: 1.0, 1: 8.0, 2: 7.0, 3: 9.0})
    assert plan.whole == (3, 1, 2) and plan.partial == (0,) and plan.remainder == 0
    plan = packer.plan({0: 9.0, 1: 8.0, 2: 7.0, 3: 1.0})
    assert plan.whole == () and plan.partial == (0,) and plan.remainder == 50
    plan = packer.plan({0: 2.0, 1: 8.0, 2: 7.0, 3: 1.0})
    assert plan.whole == (1, 2) and plan.partial == (0,) and plan.remainder == 5
    grads = {2: torch.arange(15, dtype=torch.float32)}
    chosen = packer.coordinates(packer.plan({1: 8.0, 2: 7.0}), grads)
    assert chosen[1] is None and chosen[2] is None  # 30 + 15 <= 50: both whole
    plan = WholeTensorPacker([30, 40], budget=50).plan({0: 2.0, 1: 1.0})
    chosen = WholeTensorPacker([30, 40], 50).coordinates(plan, {1: torch.arange(40.0)})
    assert chosen[0] is None and torch.equal(chosen[1], torch.arange(20, 40))


def test_paper_mask_packer_thresholds_inside_the_prefix():
    sizes = [4, 4, 4]
    packer = PaperMaskPacker(sizes, budget=5)
    plan = packer.plan({0: 3.0, 1: 2.0, 2: 1.0})
    assert plan.partial == (0, 1) and plan.remainder == 5
    grads = {0: torch.tensor([1.0, 9.0, 2.0, 8.0]), 1: torch.tensor([7.0, 0.5, 6.0, 5.0])}
    chosen = packer.coordinates(plan, grads)
    assert torch.equal(chosen[0], torch.tensor([1, 3]))
    assert torch.equal(chosen[1], torch.tensor([0, 2, 3]))


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=12),
    budget=st.integers(min_value=1, max_value=200),
    cap=st.integers(min_value=1, max_value=60),
    data=st.data(),
)
def test_capped_plans_are_monotone_and_respect_the_caps(sizes, budget, cap, data):
    scores = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=len(sizes), max_size=len(sizes)))
    order = data.draw(st.permutations(range(len(sizes))))
    final = stream_scores(WholeTensorPacker(sizes, budget, caps=[cap] * len(sizes)), scores, order)
    assert len(final.counts) == len(final.partial)
    used = sum(sizes[i] for i in final.whole) + sum(final.counts)
    assert used <= budget
    assert all(sizes[i] <= cap for i in final.whole)
    assert all(count <= min(cap, sizes[i]) for i, count in zip(final.partial, final.counts))
    # nothing left unused while some candidate could still take coordinates
    wanted = sum(min(size, cap) for size in sizes)
    assert used == min(budget, wanted)


def test_a_cap_keeps_one_huge_tensor_from_taking_the_whole_budget():
    sizes = [1000, 30, 30, 30]
    plan = WholeTensorPacker(sizes, budget=100, caps=[50] * 4).plan({0: 9.0, 1: 3.0, 2: 2.0, 3: 1.0})
    assert plan.partial == (0, 2) and plan.counts == (50, 20) and plan.whole == (1,)
    uncapped = WholeTensorPacker(sizes, budget=100).plan({0: 9.0, 1: 3.0, 2: 2.0, 3: 1.0})
    assert uncapped.whole == () and uncapped.partial == (0,) and uncapped.remainder == 100


def test_top_rows_takes_whole_rows_by_norm_and_fills_the_rest_by_magnitude():
    grad = torch.zeros(5, 4)
    grad[1] = 1.0  # norm 2
    grad[3] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # norm 3
    grad[4, 2] = 1.5  # the largest entry outside the two best rows (row norm 1.5)
    picked = top_rows(grad, count=9, row_size=4)  # stored as rows [1, 3] plus coordinate 18
    assert picked.rows.tolist() == [1, 3] and picked.extra.tolist() == [18]
    assert torch.equal(picked.long().sort().values, torch.tensor([4, 5, 6, 7, 12, 13, 14, 15, 18]))
    assert torch.equal(top_rows(grad, count=4, row_size=4).long(), torch.tensor([12, 13, 14, 15]))


def test_row_packer_selects_rows_of_the_partial_tensor():
    grads = {0: torch.tensor([[0.0, 0.1], [5.0, 5.0], [1.0, 0.0]])}
    packer = WholeTensorPacker([6], budget=4, row_sizes=[2])
    chosen = packer.coordinates(packer.plan({0: 1.0}), grads)
    assert torch.equal(chosen[0].long(), torch.tensor([2, 3, 4, 5]))


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=10),
    share=st.floats(0.01, 1.0),
    fraction=st.floats(0.001, 1.0),
)
def test_the_tensor_cap_never_leaves_budget_unused(sizes, share, fraction):
    from blockllm.selection.packing import tensor_cap

    total = sum(sizes)
    budget = max(1, int(fraction * total)) if total else 1
    if total < budget:
        return
    cap = tensor_cap(sizes, budget, share)
    assert sum(min(size, cap) for size in sizes) >= budget
    assert cap == max(1, int(share * budget)) or sum(min(size, cap - 1) for size in sizes) < budget


def test_top_rows_leftovers_are_the_same_when_found_chunk_by_chunk(monkeypatch):
    # The leftover coordinates are searched a chunk of rows at a time to keep the selection
    # step's memory near the gradient's own size; the result must not depend on the chunking.
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(37, 8, generator=generator)
    expected_rows = torch.linalg.vector_norm(grad, dim=1).topk(4).indices
    outside = grad.abs().clone()
    outside[expected_rows] = -1.0
    expected_extra = outside.reshape(-1).topk(5).indices
    offsets = torch.arange(8)
    expected = torch.cat([(expected_rows.unsqueeze(1) * 8 + offsets).reshape(-1), expected_extra])
    for chunk_entries in (8, 24, 1 << 20):
        monkeypatch.setattr("blockllm.selection.packing._CHUNK_ENTRIES", chunk_entries)
        picked = top_rows(grad, count=4 * 8 + 5, row_size=8)
        assert torch.equal(picked.long().sort().values, expected.sort().values)


def test_mask_equals_uncapped_coordinates_when_the_top_tensor_covers_the_budget():
    # Why blockllm-mask and blockllm-uncapped report the same eval loss on pretrain-cpu: there the
    # highest-scored tensor is always a vocabulary matrix larger than k, so the mask's prefix is
    # that tensor alone and its threshold keeps its k largest |G|, which is exactly what the
    # uncapped packer gives the first tensor (min(size, budget) largest-|G| coordinates). Not a
    # dead option: when the top tensor is smaller than k the two rules differ.
    generator = torch.Generator().manual_seed(0)

    def picks(sizes, scores, budget):
        grads = {i: torch.randn(size, generator=generator) for i, size in enumerate(sizes)}
        chosen = []
        for packer in (PaperMaskPacker(sizes, budget), WholeTensorPacker(sizes, budget)):
            plan = packer.plan(scores)
            coordinates = packer.coordinates(plan, {i: grads[i] for i in plan.partial})
            chosen.append({i: None if c is None else c.long().tolist() for i, c in coordinates.items()})
        return chosen

    sizes, budget = [5000, 300, 300, 40], 800
    mask, uncapped = picks(sizes, {0: 3.0, 1: 2.0, 2: 1.0, 3: 0.5}, budget)
    assert mask == uncapped and list(mask) == [0] and len(mask[0]) == budget
    # The top tensor below k: the mask thresholds |G| over the whole prefix, the packer fills
    # tensors in score order.
    mask, uncapped = picks(sizes, {1: 3.0, 2: 2.0, 0: 1.0, 3: 0.5}, budget)
    assert mask != uncapped
    assert uncapped[1] is None and uncapped[2] is None and len(uncapped[0]) == budget - 600


@pytest.mark.parametrize("need_ties", [5, (1 << 20) + 7])
def test_ties_are_taken_by_lowest_index_across_chunks(need_ties):
    # Mostly zeros (the rows of tokens a batch lacks): the ties at the threshold are found chunk
    # by chunk, stopping once enough are found; the result must be what listing every tie gives.
    from blockllm.selection.packing import _top_outside_rows, top_coordinates

    torch.manual_seed(0)
    magnitude = torch.zeros(3 * (1 << 20) + 11)
    nonzero = torch.randperm(magnitude.numel())[:1000]
    magnitude[nonzero] = torch.rand(1000) + 0.5
    count = 1000 + need_ties
    expected = torch.cat([nonzero.sort().values, (magnitude == 0).nonzero().squeeze(1)[:need_ties]])
    assert torch.equal(top_coordinates(magnitude, count).sort().values, expected.sort().values)

    # The same rule outside taken rows of a matrix (fewer than one row's worth, as there).
    by_row = torch.zeros(40000, 64)
    by_row[3, 5], by_row[39999, 63] = 2.0, -3.0
    taken = torch.zeros(40000, dtype=torch.bool)
    taken[:2] = True  # rows 0-1 are out: the lowest ties start at row 2
    got = _top_outside_rows(by_row, taken, 10)
    flat = torch.tensor([3 * 64 + 5, 39999 * 64 + 63])
    ties = torch.arange(2 * 64, 2 * 64 + 9)
    ties = ties[ties != 3 * 64 + 5][:8]
    assert torch.equal(got, torch.cat([flat, ties]).sort().values)
