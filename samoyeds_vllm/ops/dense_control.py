"""Fusion control: the samoyeds MoE kernels on dense weights (``samoyeds::moe_dense_prepacked``).

Benchmarks run it beside the sparse formats to separate what weight sparsity buys from what the fused,
gathered, routing-aware pipeline buys on its own (BENCHMARKING.md). Not used for serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cuda_kernels import cuda_kernels_available
from .kernel_layout import to_dense_kernel_layout

__all__ = ["DenseControlWeights", "moe_dense_control", "prepare_dense_control"]


@dataclass(frozen=True)
class DenseControlWeights:
    """Dense expert weights in the kernel's register order (see ``to_dense_kernel_layout``)."""

    w13_values: torch.Tensor  # [E, 2I/32, 2, H/32, 32, 16]
    w2_values: torch.Tensor  # [E, H/16, 1, I/32, 32, 16]


def prepare_dense_control(w13: torch.Tensor, w2: torch.Tensor) -> DenseControlWeights:
    """Reorder dense ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]`` once.

    On a GPU this also builds/loads the CUDA kernels, so the op below runs them rather than the reference.
    """
    if w13.is_cuda:
        cuda_kernels_available()
    return DenseControlWeights(to_dense_kernel_layout(w13, 2), to_dense_kernel_layout(w2, 1))


def moe_dense_control(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: DenseControlWeights,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE of ``ops.moe_sparse`` on dense weights, through the samoyeds kernels (reference on CPU)."""
    return torch.ops.samoyeds.moe_dense_prepacked(
        x, topk_weights, topk_ids, weights.w13_values, weights.w2_values, expert_map
    )
