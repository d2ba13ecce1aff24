"""Best mask under a structured pattern for a given score tensor (pure, vectorised torch)."""

from __future__ import annotations

import torch

from ..formats.pattern import SparsityPattern, parse_pattern

__all__ = ["magnitude_scores", "select_mask"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning score: ``|W|`` in float32, ``[..., O, I]``."""
    return weight.detach().abs().float()


# Rows are processed in blocks of about this many scores so that the intermediates stay in cache
# (measured: 1.8x faster than one pass over a 14336x4096 matrix on a 2-core x86 CPU).
_BLOCK_ELEMENTS = 1 << 20


def _two_four_mask(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 of every aligned group of 4 along the last dim, in cache-sized row blocks."""
    lead, n_in = scores.shape[:-1], scores.shape[-1]
    rows = scores.reshape(-1, n_in)
    mask = torch.empty(rows.shape, dtype=torch.bool, device=scores.device)
    kept = torch.empty((rows.shape[0], n_in // 4), dtype=scores.dtype, device=scores.device)
    step = max(1, _BLOCK_ELEMENTS // n_in)
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        mask[block], kept[block] = _two_four_block(rows[block])
    return mask.reshape(*lead, n_in), kept.reshape(*lead, n_in // 4)


def _two_four_block(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 of every aligned group of 4 along the last dim.

    Returns the bool mask ``[..., I]`` and the kept score of each group ``[..., I/4]``. An entry is kept when
    fewer than two others beat it; ``j`` beats ``i`` when its score is larger, or equal with ``j < i`` — so
    ties keep the lower position and the result is deterministic. Six pairwise comparisons per group are
    much faster on CPUs than ``topk`` over a dim of 4.
    """
    lead, n_in = scores.shape[:-1], scores.shape[-1]
    g = scores.reshape(*lead, n_in // 4, 4).unbind(-1)
    beaten = [torch.zeros_like(g[0], dtype=torch.uint8) for _ in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            j_wins = g[j] > g[i]
            beaten[i] += j_wins
            beaten[j] += ~j_wins
    keep = [b < 2 for b in beaten]
    mask = torch.stack(keep, dim=-1).reshape(*lead, n_in)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    kept = sum(torch.where(k, s, zero) for k, s in zip(keep, g, strict=True))
    return mask, kept


def select_mask(scores: torch.Tensor, pattern: str | SparsityPattern) -> torch.Tensor:
    """The mask of largest total score that satisfies ``pattern``.

    For ``2:4`` every group of 4 keeps its 2 best entries. For ``1:2:V+2:4`` every row is first 2:4-pruned;
    then in each (row pair, chunk of V) the row whose pruned segment keeps the larger total score is kept
    and the other is dropped (a tie keeps the even row). Both steps are exact maximisers of the kept score.

    Parameters
    ----------
    scores:
        ``[..., O, I]`` non-negative importance scores (e.g. ``|W|``, Wanda's ``|W| * ||X||``), any float dtype.
    pattern:
        Target pattern.

    Returns
    -------
    torch.Tensor
        ``[..., O, I]`` bool, True where kept.

    Raises
    ------
    ValueError
        If ``[O, I]`` cannot be tiled by the pattern.
    """
    pattern = parse_pattern(pattern)
    if scores.dim() < 2:
        raise ValueError(f"select_mask: scores must be [..., O, I], got shape {tuple(scores.shape)}")
    *lead, n_out, n_in = scores.shape
    pattern.check_shape(n_out, n_in, name="scores")
    mask, group_scores = _two_four_mask(scores)
    if not pattern.is_samoyeds:
        return mask
    v = pattern.chunk
    chunk_scores = group_scores.reshape(*lead, n_out // 2, 2, n_in // v, v // 4).sum(-1)  # [..., P, 2, C]
    keep_odd = chunk_scores[..., 1, :] > chunk_scores[..., 0, :]  # [..., P, C]
    row_keep = torch.stack((~keep_odd, keep_odd), dim=-2)  # [..., P, 2, C]
    row_keep = row_keep[..., None].expand(*lead, n_out // 2, 2, n_in // v, v).reshape(*lead, n_out, n_in)
    return mask & row_keep
