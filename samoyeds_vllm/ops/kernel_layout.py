"""Kernel layout of packed expert weights: the canonical format (docs/FORMAT.md) reordered once, at load time,
into the register order of the ``mma.sp.m16n8k32`` A operand, so that every thread of a warp fetches its
fragment with one 16-byte load.

For one projection with ``R`` stored rows and ``K`` input features (``S = K / 32`` k-steps), the kernel
layout is

* ``values [E, R/(16*G), G, S, 32, 8]`` — m-tile ``mt`` of group ``grp`` (G = 2 for w13: gate then up, so
  a warp holds matching gate and up rows and applies SwiGLU in registers; G = 1 for w2), k-step ``s``, lane
  ``l = 4*g + t``, then the 8 values ``a0..a3`` of that lane: ``a0 = (row g, cols 2t, 2t+1)``,
  ``a1 = (row g+8, same cols)``, ``a2 = (row g, cols 2t+8, 2t+9)``, ``a3 = (row g+8, cols 2t+8, 2t+9)``
  where cols index the 16 stored values of the k-step.
* ``meta [E, R/(16*G), G, S, 16]`` int32 — entry ``2*g + h`` is the metadata register of lanes with
  ``t = h``: ``meta16(row g, half h) | meta16(row g+8, half h) << 16``, ``meta16(r, h)`` being bits
  ``16h .. 16h+15`` of the row's 32-bit k-step metadata (the 4 canonical bytes read little-endian).
* ``rowsel`` stays canonical (``[E, R, K/V]`` uint8; read once per chunk, not per k-step).

Requirements: ``R / G`` a multiple of 16 and ``K`` a multiple of 32 (true for every supported pattern on
every shape of DESIGN.md). ``kernel_layout_supported`` says whether a weight qualifies.
"""

from __future__ import annotations

import torch

from ..formats import PackedWeight

__all__ = [
    "from_dense_kernel_layout",
    "from_kernel_layout",
    "kernel_layout_supported",
    "to_dense_kernel_layout",
    "to_kernel_layout",
]


def kernel_layout_supported(weight: PackedWeight, groups: int) -> bool:
    """True when ``weight`` (stacked ``[E, O, I]``) can be put in the kernel layout with ``groups`` groups."""
    kept_rows, n_in = weight.values.shape[-2], weight.in_features
    return weight.values.dim() == 3 and kept_rows % (16 * groups) == 0 and n_in % 32 == 0


def to_kernel_layout(weight: PackedWeight, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder canonical ``sp_values``/``sp_meta`` of ``[E, O, I]`` experts into the kernel layout.

    Parameters
    ----------
    weight:
        Stacked experts, canonical layout; ``values [E, R, I/2]``, ``meta [E, R, I/8]``.
    groups:
        2 for w13 (rows ``[0, R/2)`` gate, ``[R/2, R)`` up), 1 for w2.

    Returns
    -------
    (values, meta)
        ``values [E, R/(16G), G, S, 32, 8]`` in the weight dtype, ``meta [E, R/(16G), G, S, 16]`` int32.

    Raises
    ------
    ValueError
        If the shape is not supported (see ``kernel_layout_supported``).
    """
    if not kernel_layout_supported(weight, groups):
        raise ValueError(
            f"kernel layout needs stacked [E, R, I/2] values with R % {16 * groups} == 0 and I % 32 == 0; "
            f"got values {tuple(weight.values.shape)}"
        )
    n_exp, kept_rows, half = weight.values.shape
    tiles, steps = kept_rows // (16 * groups), half // 16
    # rows -> (grp, mt, h, g); stored cols of a k-step -> (q, t, pair)
    v = weight.values.reshape(n_exp, groups, tiles, 2, 8, steps, 2, 4, 2)
    # dims: e grp mt h g s q t pair -> e mt grp s g t q h pair
    values = v.permute(0, 2, 1, 5, 4, 7, 6, 3, 8).reshape(n_exp, tiles, groups, steps, 32, 8).contiguous()

    m32 = weight.meta.reshape(n_exp, kept_rows, steps, 4).to(torch.int64)
    m32 = m32[..., 0] | m32[..., 1] << 8 | m32[..., 2] << 16 | m32[..., 3] << 24  # [E, R, S]
    m32 = m32.reshape(n_exp, groups, tiles, 2, 8, steps)  # e grp mt h(row g / g+8) g s
    halves = torch.stack((m32 & 0xFFFF, m32 >> 16), dim=-1)  # e grp mt rh g s th
    reg = halves[:, :, :, 0] | halves[:, :, :, 1] << 16  # e grp mt g s th
    reg = torch.where(reg >= 1 << 31, reg - (1 << 32), reg).to(torch.int32)
    meta = reg.permute(0, 2, 1, 4, 3, 5).reshape(n_exp, tiles, groups, steps, 16).contiguous()
    return values, meta


def from_kernel_layout(values: torch.Tensor, meta: torch.Tensor, pattern, rowsel: torch.Tensor | None) -> PackedWeight:
    """Inverse of ``to_kernel_layout``: the canonical ``PackedWeight`` (used by the CPU reference path)."""
    n_exp, tiles, groups, steps = values.shape[:4]
    v = values.reshape(n_exp, tiles, groups, steps, 8, 4, 2, 2, 2)  # e mt grp s g t q h pair
    canon_values = v.permute(0, 2, 1, 7, 4, 3, 6, 5, 8).reshape(n_exp, groups * tiles * 16, steps * 16)

    reg = meta.to(torch.int64) & 0xFFFFFFFF
    reg = reg.reshape(n_exp, tiles, groups, steps, 8, 2)  # e mt grp s g th
    rows = torch.stack((reg & 0xFFFF, reg >> 16), dim=-1)  # e mt grp s g th rh
    m32 = rows[..., 0, :] | rows[..., 1, :] << 16  # e mt grp s g rh
    m32 = m32.permute(0, 2, 1, 5, 4, 3).reshape(n_exp, groups * tiles * 16, steps)
    canon_meta = torch.stack([(m32 >> (8 * b)) & 0xFF for b in range(4)], dim=-1).to(torch.uint8)
    return PackedWeight(pattern, canon_values.contiguous(), canon_meta.reshape(n_exp, -1, steps * 4), rowsel)


def to_dense_kernel_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense ``[E, R, K]`` experts in the register order of two ``mma.m16n8k16`` A fragments per k-step.

    Used only by the fusion control (``samoyeds::moe_dense_prepacked``): the same kernels as the sparse
    formats, on dense weights. Returns ``[E, R/(16G), G, K/32, 32, 16]``: lane ``l = 4g + t`` holds, for
    half ``h`` of the k-step (inputs ``16h .. 16h+15``), ``a0..a3 = (row g | g+8) x (cols 2t, 2t+1 | 2t+8,
    2t+9)`` of that half, two values each.

    Raises
    ------
    ValueError
        If ``R`` is not a multiple of ``16 * groups`` or ``K`` of 32.
    """
    if weight.dim() != 3 or weight.shape[1] % (16 * groups) or weight.shape[2] % 32:
        raise ValueError(
            f"dense kernel layout needs [E, R, K] with R % {16 * groups} == 0 and K % 32 == 0; "
            f"got {tuple(weight.shape)}"
        )
    n_exp, rows, n_in = weight.shape
    tiles, steps = rows // (16 * groups), n_in // 32
    v = weight.reshape(n_exp, groups, tiles, 2, 8, steps, 2, 2, 4, 2)  # e grp mt qr g s h qc t pair
    # -> e mt grp s g t h qc qr pair   (q = 2 * qc + qr)
    return v.permute(0, 2, 1, 5, 4, 8, 6, 7, 3, 9).reshape(n_exp, tiles, groups, steps, 32, 16).contiguous()


def from_dense_kernel_layout(values: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_dense_kernel_layout``: dense ``[E, R, K]``."""
    n_exp, tiles, groups, steps = values.shape[:4]
    v = values.reshape(n_exp, tiles, groups, steps, 8, 4, 2, 2, 2, 2)  # e mt grp s g t h qc qr pair
    return v.permute(0, 2, 1, 8, 4, 3, 6, 7, 5, 9).reshape(n_exp, groups * tiles * 16, steps * 32).contiguous()
