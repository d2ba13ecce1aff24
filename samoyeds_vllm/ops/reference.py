"""Exact torch reference of the ``samoyeds::`` ops: the definition of correct for every kernel.

Weights are expanded with ``formats.unpack`` and multiplied in float32; results are cast back to the input
dtype once, at the end. Works on any device (CPU in CI; on a GPU it is the fallback when no kernel is built).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import PackedWeight, unpack
from ..formats.pattern import PatternKind, SparsityPattern

__all__ = ["linear_sparse_reference", "moe_dense_reference", "moe_sparse_reference", "pattern_of_chunk"]


def pattern_of_chunk(chunk: int) -> SparsityPattern:
    """The pattern encoded by an op's ``chunk`` argument: 0 is ``2:4``, V is ``1:2:V+2:4``."""
    if chunk == 0:
        return SparsityPattern(PatternKind.TWO_FOUR)
    return SparsityPattern(PatternKind.SAMOYEDS, chunk)


def _expert(values: torch.Tensor, meta: torch.Tensor, rowsel: torch.Tensor | None, e: int, chunk: int):
    return PackedWeight(pattern_of_chunk(chunk), values[e], meta[e], None if rowsel is None else rowsel[e])


def linear_sparse_reference(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, rowsel: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """``y[..., O] = x[..., I] @ W[O, I]^T`` with W given packed; float32 math, output in ``x.dtype``."""
    dense = unpack(PackedWeight(pattern_of_chunk(chunk), values, meta, rowsel))
    return (x.float() @ dense.float().t()).to(x.dtype)


def moe_sparse_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_values: torch.Tensor,
    w13_meta: torch.Tensor,
    w13_rowsel: torch.Tensor | None,
    w2_values: torch.Tensor,
    w2_meta: torch.Tensor,
    w2_rowsel: torch.Tensor | None,
    chunk: int,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed-expert SwiGLU MoE on packed weights (see ``ops.moe_sparse`` for the formula)."""
    return _routed_moe(
        x,
        topk_weights,
        topk_ids,
        w13_values.shape[0],
        lambda e: unpack(_expert(w13_values, w13_meta, w13_rowsel, e, chunk)),
        lambda e: unpack(_expert(w2_values, w2_meta, w2_rowsel, e, chunk)),
        expert_map,
    )


def moe_dense_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same MoE on dense ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (reference of the fusion control)."""
    return _routed_moe(x, topk_weights, topk_ids, w13.shape[0], w13.__getitem__, w2.__getitem__, expert_map)


def _routed_moe(x, topk_weights, topk_ids, n_experts: int, w13_of, w2_of, expert_map) -> torch.Tensor:
    """``out[t] = sum_j w[t,j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))`` in float32, per local expert."""
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]  # global -> local id; -1 marks experts of other ranks
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(n_experts):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gate_up = x[token].float() @ w13_of(e).float().t()
        gate, up = gate_up.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2_of(e).float().t()
        out.index_add_(0, token, y * topk_weights[token, slot].float()[:, None])
    return out.to(x.dtype)
