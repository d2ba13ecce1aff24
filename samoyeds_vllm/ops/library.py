"""The ``samoyeds`` torch.library namespace: op schemas, shared argument checks, fakes, reference impls.

This module is the only place that defines ``torch.ops.samoyeds``. The exact reference is registered under
``CompositeExplicitAutograd`` so it serves every device; a compiled kernel registered for the ``CUDA``
dispatch key (csrc/) takes precedence on GPUs. The fakes run the same checks as the real ops, so tracing
(torch.compile, vLLM's Dynamo pass) fails exactly where a real call would.
"""

from __future__ import annotations

import torch

from ..formats import VALUE_DTYPES
from ..formats.pattern import SUPPORTED_CHUNKS
from .kernel_layout import from_dense_kernel_layout, from_kernel_layout
from .reference import linear_sparse_reference, moe_dense_reference, moe_sparse_reference, pattern_of_chunk

__all__ = ["check_linear_args", "check_moe_args", "check_moe_dense_prepacked_args", "check_moe_prepacked_args"]

_LIB = torch.library.Library("samoyeds", "DEF")

_LIB.define("linear_sparse(Tensor x, Tensor values, Tensor meta, Tensor? rowsel, int chunk) -> Tensor")
_LIB.define(
    "moe_sparse(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_values, Tensor w13_meta, "
    "Tensor? w13_rowsel, Tensor w2_values, Tensor w2_meta, Tensor? w2_rowsel, int chunk, "
    "Tensor? expert_map=None) -> Tensor"
)
# Same computation on weights already reordered into the kernel layout (ops/kernel_layout.py) at load time.
_LIB.define(
    "moe_sparse_prepacked(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_values, Tensor w13_meta, "
    "Tensor? w13_rowsel, Tensor w2_values, Tensor w2_meta, Tensor? w2_rowsel, int chunk, "
    "Tensor? expert_map=None) -> Tensor"
)
# Fusion control for benchmarks: the same kernels on dense weights in ops.kernel_layout.to_dense_kernel_layout.
_LIB.define(
    "moe_dense_prepacked(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_values, Tensor w2_values, "
    "Tensor? expert_map=None) -> Tensor"
)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"samoyeds::{op}: {message}")


def _check_packed(op: str, name: str, values, meta, rowsel, chunk: int) -> tuple[int, int]:
    """Check one packed weight's tensors; return its dense ``(O, I)``."""
    if chunk != 0 and chunk not in SUPPORTED_CHUNKS:
        _fail(op, f"chunk={chunk}: use 0 for 2:4 or V in {list(SUPPORTED_CHUNKS)} for 1:2:V+2:4")
    if values.dtype not in VALUE_DTYPES:
        _fail(op, f"{name}_values dtype {values.dtype} is not bf16, fp16 or fp32")
    if meta.dtype != torch.uint8:
        _fail(op, f"{name}_meta must be uint8, got {meta.dtype}")
    lead, kept, n_in = values.shape[:-2], values.shape[-2], values.shape[-1] * 2
    if tuple(meta.shape) != (*lead, kept, n_in // 8) or n_in % 8:
        _fail(op, f"{name}_meta shape {tuple(meta.shape)} does not match {name}_values {tuple(values.shape)}")
    if chunk == 0:
        if rowsel is not None:
            _fail(op, f"{name}_rowsel given but chunk=0 (2:4) has no row selection")
        return kept, n_in
    if rowsel is None:
        _fail(op, f"{name}_rowsel is required for 1:2:{chunk}+2:4")
    if rowsel.dtype != torch.uint8 or tuple(rowsel.shape) != (*lead, kept, n_in // chunk) or n_in % chunk:
        _fail(
            op,
            f"{name}_rowsel must be uint8 {(*lead, kept, n_in // chunk)} with I % {chunk} == 0, got "
            f"{rowsel.dtype} {tuple(rowsel.shape)} for I={n_in}",
        )
    return kept * 2, n_in


def check_linear_args(x, values, meta, rowsel, chunk: int) -> int:
    """Validate ``samoyeds::linear_sparse`` arguments; return O."""
    op = "linear_sparse"
    if values.dim() != 2:
        _fail(op, f"values must be [R, I/2], got shape {tuple(values.shape)}")
    n_out, n_in = _check_packed(op, "w", values, meta, rowsel, chunk)
    if x.dtype != values.dtype:
        _fail(op, f"x dtype {x.dtype} != weight dtype {values.dtype}")
    if x.shape[-1] != n_in:
        _fail(op, f"x has {x.shape[-1]} input features, the weight has I={n_in}")
    return n_out


def check_moe_args(
    x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk, expert_map=None
) -> None:
    """Validate ``samoyeds::moe_sparse`` arguments (shapes, dtypes, devices; never tensor contents)."""
    op = "moe_sparse"
    if x.dim() != 2:
        _fail(op, f"x must be [T, H], got shape {tuple(x.shape)}")
    if w13_values.dim() != 3 or w2_values.dim() != 3:
        _fail(op, f"w13_values/w2_values must be [E, R, K/2], got {tuple(w13_values.shape)}, {tuple(w2_values.shape)}")
    n13, hidden = _check_packed(op, "w13", w13_values, w13_meta, w13_rowsel, chunk)
    n_hidden_out, inter = _check_packed(op, "w2", w2_values, w2_meta, w2_rowsel, chunk)
    if x.dtype != w13_values.dtype or x.dtype != w2_values.dtype:
        _fail(op, f"x dtype {x.dtype} must equal the weights' dtypes ({w13_values.dtype}, {w2_values.dtype})")
    if x.shape[1] != hidden or n_hidden_out != hidden:
        _fail(op, f"hidden size mismatch: x has H={x.shape[1]}, w13 has I={hidden}, w2 has O={n_hidden_out}")
    if n13 != 2 * inter:
        _fail(op, f"w13 must have 2 * intermediate = {2 * inter} output features (gate then up), has {n13}")
    if w13_values.shape[0] != w2_values.shape[0]:
        _fail(op, f"w13 has {w13_values.shape[0]} experts, w2 has {w2_values.shape[0]}")
    if topk_weights.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        _fail(
            op,
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both be "
            f"[T={x.shape[0]}, k]",
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        _fail(op, f"topk_weights must be floating point, got {topk_weights.dtype}")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)):
        _fail(
            op,
            f"expert_map must be a 1-D int32/int64 global->local map, got {expert_map.dtype} {tuple(expert_map.shape)}",
        )
    tensors = (topk_weights, topk_ids, w13_values, w13_meta, w2_values, w2_meta, w13_rowsel, w2_rowsel, expert_map)
    devices = {t.device for t in tensors if t is not None}
    if devices - {x.device}:
        _fail(op, f"all tensors must be on x's device {x.device}, found {sorted(map(str, devices))}")


def _linear_sparse_impl(x, values, meta, rowsel, chunk):
    check_linear_args(x, values, meta, rowsel, chunk)
    return linear_sparse_reference(x, values, meta, rowsel, chunk)


def _moe_sparse_impl(*args):
    check_moe_args(*args)
    return moe_sparse_reference(*args)


_LIB.impl("linear_sparse", _linear_sparse_impl, "CompositeExplicitAutograd")
_LIB.impl("moe_sparse", _moe_sparse_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("samoyeds::linear_sparse")
def _linear_sparse_fake(x, values, meta, rowsel, chunk):
    n_out = check_linear_args(x, values, meta, rowsel, chunk)
    return x.new_empty((*x.shape[:-1], n_out))


@torch.library.register_fake("samoyeds::moe_sparse")
def _moe_sparse_fake(*args):
    check_moe_args(*args)
    return torch.empty_like(args[0])


def check_moe_prepacked_args(
    x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk, expert_map=None
) -> None:
    """Validate ``samoyeds::moe_sparse_prepacked`` arguments: kernel-layout shapes, then the common checks."""
    op = "moe_sparse_prepacked"
    for name, values, meta, groups in (("w13", w13_values, w13_meta, 2), ("w2", w2_values, w2_meta, 1)):
        if values.dim() != 6 or values.shape[2] != groups or values.shape[4:] != (32, 8):
            _fail(op, f"{name}_values must be kernel layout [E, MT, {groups}, S, 32, 8], got {tuple(values.shape)}")
        if meta.dtype != torch.int32 or tuple(meta.shape) != (*values.shape[:4], 16):
            _fail(op, f"{name}_meta must be int32 {(*values.shape[:4], 16)}, got {meta.dtype} {tuple(meta.shape)}")
    # Check the canonical shapes these tensors stand for with the shared checks (no allocation).
    w13_spec, w13_meta_spec = _canonical_specs(w13_values, w13_meta.device)
    w2_spec, w2_meta_spec = _canonical_specs(w2_values, w2_meta.device)
    specs = (w13_spec, w13_meta_spec, w13_rowsel, w2_spec, w2_meta_spec, w2_rowsel)
    check_moe_args(x, topk_weights, topk_ids, *specs, chunk, expert_map)


def _canonical_specs(values: torch.Tensor, meta_device: torch.device) -> tuple[_Spec, _Spec]:
    """Canonical ``(sp_values, sp_meta)`` shapes of kernel-layout ``values [E, MT, G, S, 32, *]`` as 2:4."""
    n_exp, tiles, groups, steps = values.shape[:4]
    rows = groups * tiles * 16
    return (
        _Spec((n_exp, rows, steps * 16), values.dtype, values.device),
        _Spec((n_exp, rows, steps * 4), torch.uint8, meta_device),
    )


class _Spec:
    """Shape, dtype and device of a tensor that need not exist (for the shared checks)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def dim(self) -> int:
        return len(self.shape)


def _moe_sparse_prepacked_impl(
    x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk, expert_map=None
):
    check_moe_prepacked_args(
        x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk, expert_map
    )
    pattern = pattern_of_chunk(chunk)
    w13 = from_kernel_layout(w13_values, w13_meta, pattern, w13_rowsel)
    w2 = from_kernel_layout(w2_values, w2_meta, pattern, w2_rowsel)
    return moe_sparse_reference(
        x, topk_weights, topk_ids, w13.values, w13.meta, w13.rowsel, w2.values, w2.meta, w2.rowsel, chunk, expert_map
    )


_LIB.impl("moe_sparse_prepacked", _moe_sparse_prepacked_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("samoyeds::moe_sparse_prepacked")
def _moe_sparse_prepacked_fake(*args, **kwargs):
    check_moe_prepacked_args(*args, **kwargs)
    return torch.empty_like(args[0])


def check_moe_dense_prepacked_args(x, topk_weights, topk_ids, w13_values, w2_values, expert_map=None) -> None:
    """Validate ``samoyeds::moe_dense_prepacked`` arguments (dense kernel layout, then the common checks)."""
    op = "moe_dense_prepacked"
    for name, values, groups in (("w13", w13_values, 2), ("w2", w2_values, 1)):
        if values.dim() != 6 or values.shape[2] != groups or values.shape[4:] != (32, 16):
            expected = f"[E, MT, {groups}, S, 32, 16]"
            _fail(op, f"{name}_values must be dense kernel layout {expected}, got {tuple(values.shape)}")
    # A dense weight passes the shared checks as the 2:4 packing of the same shape.
    w13_spec, w13_meta_spec = _canonical_specs(w13_values, w13_values.device)
    w2_spec, w2_meta_spec = _canonical_specs(w2_values, w2_values.device)
    check_moe_args(x, topk_weights, topk_ids, w13_spec, w13_meta_spec, None, w2_spec, w2_meta_spec, None, 0, expert_map)


def _moe_dense_prepacked_impl(x, topk_weights, topk_ids, w13_values, w2_values, expert_map=None):
    check_moe_dense_prepacked_args(x, topk_weights, topk_ids, w13_values, w2_values, expert_map)
    return moe_dense_reference(
        x,
        topk_weights,
        topk_ids,
        from_dense_kernel_layout(w13_values),
        from_dense_kernel_layout(w2_values),
        expert_map,
    )


_LIB.impl("moe_dense_prepacked", _moe_dense_prepacked_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("samoyeds::moe_dense_prepacked")
def _moe_dense_prepacked_fake(*args, **kwargs):
    check_moe_dense_prepacked_args(*args, **kwargs)
    return torch.empty_like(args[0])
