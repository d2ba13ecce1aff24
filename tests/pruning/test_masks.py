"""Mask selection keeps the best legal mask under each pattern."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from samoyeds_vllm.formats import SUPPORTED_CHUNKS, pack, parse_pattern
from samoyeds_vllm.pruning import magnitude_scores, select_mask

PATTERNS = ["2:4", *[f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS]]


def _assert_satisfies(mask: torch.Tensor, pattern: str) -> None:
    p = parse_pattern(pattern)
    *lead, n_out, n_in = mask.shape
    groups = mask.reshape(*lead, n_out, n_in // 4, 4).sum(-1)
    assert int(groups.max()) <= 2
    if p.is_samoyeds:
        owners = mask.reshape(*lead, n_out // 2, 2, n_in // p.chunk, p.chunk).any(-1)
        assert not (owners[..., 0, :] & owners[..., 1, :]).any()


@given(
    st.sampled_from(PATTERNS),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_masks_satisfy_the_pattern_and_have_full_density(pattern, rows, cols, seed, dtype):
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, rows * 2, cols * p.col_multiple, generator=gen).to(dtype) + 0.01
    mask = select_mask(scores, p)
    _assert_satisfies(mask, pattern)
    assert mask.float().mean().item() == p.density  # positive scores: every slot is used
    pack(torch.randn(mask.shape), mask, p)  # the packer accepts every produced mask


def _brute_force_best(scores: torch.Tensor, pattern: str) -> float:
    """Best kept score over all legal masks of one row pair of one chunk (exhaustive)."""
    p = parse_pattern(pattern)
    best_24 = []
    for row in scores:
        total = 0.0
        for g in row.reshape(-1, 4):
            total += max(float(g[i] + g[j]) for i, j in itertools.combinations(range(4), 2))
        best_24.append(total)
    return max(best_24) if p.is_samoyeds else sum(best_24)


@given(st.integers(0, 2**31 - 1))
def test_samoyeds_mask_is_optimal_per_pair_and_chunk(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 32, generator=gen)
    mask = select_mask(scores, "1:2:32+2:4")
    assert float(scores[mask].sum()) == pytest.approx(_brute_force_best(scores, "1:2:32+2:4"), rel=1e-6)


def test_two_four_mask_is_optimal_and_breaks_ties_to_the_lower_position():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    mask = select_mask(scores, "2:4")
    assert mask.tolist() == [[True, False, True, False, True, True, False, False]]


def test_samoyeds_tie_keeps_the_even_row():
    mask = select_mask(torch.ones(2, 32), "1:2:32+2:4")
    assert mask[0].sum() == 16 and mask[1].sum() == 0


def test_samoyeds_picks_the_row_with_more_kept_score_per_chunk():
    scores = torch.zeros(2, 64)
    scores[0, :32] = 1.0  # row 0 wins chunk 0
    scores[1, 32:] = 1.0  # row 1 wins chunk 1
    scores[0, 32:36] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # but a single strong group cannot beat 8 groups of 2
    mask = select_mask(scores, "1:2:32+2:4")
    assert mask[0, :32].sum() == 16 and mask[1, :32].sum() == 0
    # chunk 1: row 0 keeps 10 (top-2 of its 5s), row 1 keeps 16 (8 groups x 2)
    assert mask[1, 32:].sum() == 16 and mask[0, 32:].sum() == 0


def test_magnitude_scores_are_absolute_float32():
    w = torch.tensor([[-2.0, 1.0]], dtype=torch.bfloat16)
    s = magnitude_scores(w)
    assert s.dtype == torch.float32 and s.tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize(("pattern", "shape"), [("2:4", (4, 6)), ("1:2:64+2:4", (4, 96)), ("1:2:32+2:4", (3, 32))])
def test_select_mask_rejects_shapes_the_pattern_cannot_tile(pattern, shape):
    with pytest.raises(ValueError, match="scores: pattern"):
        select_mask(torch.rand(shape), pattern)


def test_block_processing_equals_one_pass(monkeypatch):
    """Cache blocking is an implementation detail: the mask must not depend on the block size."""
    import samoyeds_vllm.pruning.masks as masks

    scores = torch.rand(3, 50, 128)
    full = select_mask(scores, "1:2:32+2:4")
    monkeypatch.setattr(masks, "_BLOCK_ELEMENTS", 128 * 7)
    assert torch.equal(select_mask(scores, "1:2:32+2:4"), full)
