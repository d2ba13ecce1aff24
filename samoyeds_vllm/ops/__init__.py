"""Typed entry points to the ``samoyeds::`` ops: the one call path for vLLM, Transformers and benchmarks.

Importing this package registers the ops (``torch.ops.samoyeds.*``). On CPU the exact reference runs; on a
GPU the compiled kernel runs when it is built, the reference otherwise.
"""

from __future__ import annotations

import torch

from ..formats import PackedWeight
from . import library  # noqa: F401  (registers torch.ops.samoyeds)
from .dense_control import DenseControlWeights, moe_dense_control, prepare_dense_control
from .moe import MoEWeights, moe_forward, prepare_moe_weights

__all__ = [
    "DenseControlWeights",
    "MoEWeights",
    "chunk_of",
    "linear_sparse",
    "moe_dense_control",
    "moe_forward",
    "moe_sparse",
    "prepare_dense_control",
    "prepare_moe_weights",
]


def chunk_of(weight: PackedWeight) -> int:
    """The ops' ``chunk`` argument for a packed weight: V for ``1:2:V+2:4``, 0 for ``2:4``."""
    return weight.pattern.chunk


def linear_sparse(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """Sparse linear layer: ``y = x @ W^T``.

    Parameters
    ----------
    x:
        ``[..., I]``, same dtype as the weight values.
    weight:
        Packed ``W[O, I]`` (no leading expert dim).

    Returns
    -------
    torch.Tensor
        ``[..., O]`` in ``x.dtype`` (float32 accumulation).
    """
    return torch.ops.samoyeds.linear_sparse(x, weight.values, weight.meta, weight.rowsel, chunk_of(weight))


def moe_sparse(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: PackedWeight,
    w2: PackedWeight,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts of a SwiGLU MoE layer on packed weights (router already applied).

    ``out[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))`` with
    ``e = expert_map[topk_ids[t, j]]`` (identity without a map); slots whose expert maps to -1 (another
    rank's expert) contribute nothing. W13 stacks W1 (gate, rows ``[0, I)``) over W3 (up, rows ``[I, 2I)``).

    Parameters
    ----------
    x:
        ``[T, H]`` in bf16, fp16 or fp32 (the weights' dtype).
    topk_weights:
        ``[T, k]`` routing weights, float (fp32 in vLLM).
    topk_ids:
        ``[T, k]`` int32 or int64 expert ids (global ids when ``expert_map`` is given).
    w13:
        Packed ``[E, 2I, H]``.
    w2:
        Packed ``[E, H, I]``, same pattern as ``w13``.
    expert_map:
        Optional ``[E_global]`` int32 map from global to local expert id, -1 for experts not on this rank.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``: this rank's partial sum over its experts.

    Raises
    ------
    ValueError
        On mismatched shapes, dtypes, devices or patterns.
    """
    if w13.pattern != w2.pattern:
        raise ValueError(f"moe_sparse: w13 pattern {w13.pattern} != w2 pattern {w2.pattern}")
    return torch.ops.samoyeds.moe_sparse(
        x,
        topk_weights,
        topk_ids,
        w13.values,
        w13.meta,
        w13.rowsel,
        w2.values,
        w2.meta,
        w2.rowsel,
        chunk_of(w13),
        expert_map,
    )
