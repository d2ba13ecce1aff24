"""MoE weights prepared once at load time, and the forward that picks the matching ``samoyeds::`` op.

``prepare_moe_weights`` is what vLLM's ``process_weights_after_loading`` and the Transformers quantizer call:
on a GPU with the kernels built it reorders the canonical tensors into the kernel layout; otherwise it keeps
them canonical. ``moe_forward`` then calls ``samoyeds::moe_sparse_prepacked`` or ``samoyeds::moe_sparse``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..formats import PackedWeight
from .cuda_kernels import cuda_kernels_available
from .kernel_layout import kernel_layout_supported, to_kernel_layout

__all__ = ["MoEWeights", "moe_forward", "prepare_moe_weights"]

logger = logging.getLogger(__name__)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MoEWeights:
    """Packed ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` in the layout the selected op expects.

    ``kernel_layout`` True: values ``[E, MT, G, S, 32, 8]``, meta ``[E, MT, G, S, 16]`` int32 (see
    ``ops/kernel_layout.py``); False: the canonical tensors of docs/FORMAT.md. ``rowsel`` is canonical in both.
    """

    chunk: int
    kernel_layout: bool
    w13_values: torch.Tensor
    w13_meta: torch.Tensor
    w13_rowsel: torch.Tensor | None
    w2_values: torch.Tensor
    w2_meta: torch.Tensor
    w2_rowsel: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Tensors by parameter name (``w13_sp_values`` ...), for engines that keep them as module attributes."""
        return {
            "w13_sp_values": self.w13_values,
            "w13_sp_meta": self.w13_meta,
            "w13_sp_rowsel": self.w13_rowsel,
            "w2_sp_values": self.w2_values,
            "w2_sp_meta": self.w2_meta,
            "w2_sp_rowsel": self.w2_rowsel,
        }


_LOGGED: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def use_kernel_layout(w13: PackedWeight, w2: PackedWeight) -> bool:
    """Whether these weights will run on the CUDA kernel (device, dtype, shape and a successful build)."""
    if not w13.values.is_cuda or w13.dtype not in _KERNEL_DTYPES:
        return False
    if not (kernel_layout_supported(w13, groups=2) and kernel_layout_supported(w2, groups=1)):
        _log_once(
            logging.WARNING,
            f"samoyeds: expert shape w13 {w13.dense_shape} / w2 {w2.dense_shape} is not tiled by the CUDA kernel "
            "(needs I and H multiples of 32 stored rows); using the exact torch reference",
        )
        return False
    return cuda_kernels_available()


def prepare_moe_weights(w13: PackedWeight, w2: PackedWeight) -> MoEWeights:
    """Put stacked canonical expert weights into the layout of the fastest available op (once, at load).

    Parameters
    ----------
    w13:
        Packed ``[E, 2I, H]`` (gate rows then up rows).
    w2:
        Packed ``[E, H, I]``, same pattern and device.

    Returns
    -------
    MoEWeights
    """
    if w13.pattern != w2.pattern:
        raise ValueError(f"prepare_moe_weights: w13 pattern {w13.pattern} != w2 pattern {w2.pattern}")
    chunk = w13.pattern.chunk
    if use_kernel_layout(w13, w2):
        v13, m13 = to_kernel_layout(w13, groups=2)
        v2, m2 = to_kernel_layout(w2, groups=1)
        _log_once(logging.INFO, "samoyeds: MoE experts run on the CUDA mma.sp kernels")
        return MoEWeights(chunk, True, v13, m13, w13.rowsel, v2, m2, w2.rowsel)
    if w13.values.is_cuda:
        _log_once(logging.WARNING, "samoyeds: MoE experts on a GPU run the exact torch reference (slow)")
    return MoEWeights(chunk, False, w13.values, w13.meta, w13.rowsel, w2.values, w2.meta, w2.rowsel)


def moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: MoEWeights,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed-expert forward on prepared weights; same formula and arguments as ``ops.moe_sparse``."""
    op = torch.ops.samoyeds.moe_sparse_prepacked if weights.kernel_layout else torch.ops.samoyeds.moe_sparse
    return op(
        x,
        topk_weights,
        topk_ids,
        weights.w13_values,
        weights.w13_meta,
        weights.w13_rowsel,
        weights.w2_values,
        weights.w2_meta,
        weights.w2_rowsel,
        weights.chunk,
        expert_map,
    )
