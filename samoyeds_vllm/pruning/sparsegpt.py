"""SparseGPT (Frantar & Alistarh, 2023) under the 2:4 and 1:2:V+2:4 patterns (pure functions).

The weight ``W[O, I]`` is pruned column by column, left to right. Pruning column ``i`` leaves an error that the
Optimal Brain Surgeon update spreads over the not-yet-visited columns ``i+1 ..`` through the inverse Hessian of the
layer's reconstruction loss ``||X W^T - X W'^T||^2`` (``H = X^T X``, ``X [T, I]`` the calibration inputs), so the
kept weights compensate for the removed ones. The mask is chosen lazily: at the start of every pattern tile of
``t`` columns (``t = 8`` for 2:4, ``t = V`` for 1:2:V+2:4) ``select_mask`` picks the best pattern-conforming mask
of that tile from the OBS saliency ``W[o, i]^2 / [H^-1]_ii^2`` of the *already updated* weights. For 1:2:V+2:4 the
row-pair selection of each chunk therefore also follows the OBS saliency, not the raw magnitude.
"""

from __future__ import annotations

import torch

from ..formats.pattern import SparsityPattern, parse_pattern
from .masks import select_mask

__all__ = ["hessian_inverse_factor", "sparsegpt_prune"]


def hessian_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, as SparseGPT's column loop consumes it.

    Parameters
    ----------
    hessian:
        ``[I, I]`` symmetric positive semi-definite ``sum_t s_t x_t x_t^T`` (any positive scale), float.
    damp:
        Fraction of the mean diagonal added to the diagonal (numerical stability, rank-deficient Hessians).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``U [I, I]`` float32 upper triangular with ``U^T U = (H + damp)^-1``, and ``dead [I]`` bool: input channels
        that never saw a nonzero activation (their weights carry no information and are pruned first).

    Raises
    ------
    ValueError
        If ``hessian`` is not square or ``damp`` is not positive.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian_inverse_factor: hessian must be [I, I], got {tuple(hessian.shape)}")
    if damp <= 0:
        raise ValueError(f"hessian_inverse_factor: damp must be > 0, got {damp}")
    h = hessian.detach().float().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean().item()
    for attempt in range(4):  # raise the damping until the factorisation succeeds (near-singular H)
        damped = h + (damp * 10**attempt) * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    else:
        raise ValueError("hessian_inverse_factor: the damped Hessian is not positive definite (NaN inputs?)")
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str | SparsityPattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    inverse_factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` to ``pattern`` with SparseGPT's OBS updates; returns the updated pruned weight and its mask.

    Parameters
    ----------
    weight:
        ``[O, I]`` dense weight (``nn.Linear`` layout), any float dtype.
    hessian:
        ``[I, I]`` ``sum_t s_t x_t x_t^T`` over the calibration inputs ``x_t`` of this weight (for an expert: its
        routed tokens; ``s_t`` = 1 or the routing probability).
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    block_size:
        Columns updated together (lazy batch updates); rounded down to a multiple of the pattern tile (8 or V),
        at least one tile. Does not change the result beyond float rounding.
    damp:
        Relative diagonal damping of the Hessian.
    inverse_factor:
        ``hessian_inverse_factor(hessian, damp)`` if already computed (weights that share inputs, such as an
        expert's gate and up projections, share it); ``hessian`` is then only shape-checked.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``weight' [O, I]`` in ``weight.dtype``, zero outside the mask, kept entries updated; ``mask [O, I]`` bool
        satisfying ``pattern``.

    Raises
    ------
    ValueError
        If ``[O, I]`` does not tile by the pattern or the Hessian is not ``[I, I]``.
    """
    pattern = parse_pattern(pattern)
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt_prune: weight must be [O, I], got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    pattern.check_shape(n_out, n_in, name="sparsegpt_prune weight")
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(f"sparsegpt_prune: hessian must be [I, I] = [{n_in}, {n_in}], got {tuple(hessian.shape)}")
    tile = pattern.col_multiple
    block = max(tile, block_size // tile * tile)

    w = weight.detach().float().clone()
    hinv, dead = inverse_factor if inverse_factor is not None else hessian_inverse_factor(hessian.to(w.device), damp)
    hinv, dead = hinv.to(w.device), dead.to(w.device)
    w[:, dead] = 0.0
    mask = torch.zeros((n_out, n_in), dtype=torch.bool, device=w.device)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = h1.diagonal()
        m1 = mask[:, i1:i2]
        for i in range(i2 - i1):
            if i % tile == 0:
                saliency = w1[:, i : i + tile] ** 2 / d1[i : i + tile] ** 2
                m1[:, i : i + tile] = select_mask(saliency, pattern)
            col = w1[:, i]
            kept = col * m1[:, i]
            err = (col - kept) / d1[i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            w1[:, i] = kept
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.mul_(mask)
    return w.to(weight.dtype), mask
