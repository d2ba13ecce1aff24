"""Wanda importance scores (Sun et al., 2023): ``|W| * ||X||_2`` per input channel (pure function)."""

from __future__ import annotations

import torch

__all__ = ["wanda_scores"]


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda score of every weight: its magnitude times the L2 norm of its input channel over calibration tokens.

    ``score[o, i] = |W[o, i]| * sqrt(sum_t s_t * X[t, i]^2)``, where ``s_t`` is 1 (plain Wanda) or the token's
    routing probability (router-weighted statistics, accumulated by the caller).

    Parameters
    ----------
    weight:
        ``[..., O, I]`` dense weight, any float dtype.
    input_sq_sum:
        ``[I]`` float32, the (optionally routing-weighted) sum over calibration tokens of each input channel's
        square (see ``convert.calibration``).

    Returns
    -------
    torch.Tensor
        ``[..., O, I]`` float32 non-negative scores, for ``select_mask``.

    Raises
    ------
    ValueError
        If ``input_sq_sum`` is not ``[I]`` or has negative entries.
    """
    if input_sq_sum.dim() != 1 or input_sq_sum.shape[0] != weight.shape[-1]:
        raise ValueError(
            f"wanda_scores: input_sq_sum must be [I] = [{weight.shape[-1]}] for weight {tuple(weight.shape)}, "
            f"got {tuple(input_sq_sum.shape)}"
        )
    if bool((input_sq_sum < 0).any()):
        raise ValueError("wanda_scores: input_sq_sum holds negative entries; it must be a sum of squares")
    norms = input_sq_sum.to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().float() * norms
