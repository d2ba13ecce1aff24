"""Canonical packed layout (format_version 1): pack, unpack, validate, slice.

The layout is specified in docs/FORMAT.md. In short, for a dense weight ``W[..., O, I]`` (leading dims are
stacked experts) with ``R = O / row_group`` kept rows (``row_group`` is 1 for 2:4, 2 for samoyeds):

* ``sp_values [..., R, I/2]`` — the model dtype; the two kept values of each group of 4, ascending position.
* ``sp_meta   [..., R, I/8]`` uint8 — byte ``b`` covers groups ``2b`` (bits 0-3) and ``2b+1`` (bits 4-7);
  a group's nibble is ``p0 | p1 << 2`` with in-group positions ``p0 < p1``.
* ``sp_rowsel [..., O/2, I/V]`` uint8, samoyeds only — 0 or 1: which row of pair p owns chunk c.

All functions here are pure torch and run on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import META_SPAN, SparsityPattern, parse_pattern

__all__ = [
    "FORMAT_VERSION",
    "SUFFIXES",
    "VALUE_DTYPES",
    "PackedWeight",
    "pack",
    "packed_shapes",
    "unpack",
    "validate",
]

#: Version of the on-disk layout written into ``quantization_config.format_version``.
FORMAT_VERSION = 1

#: Checkpoint key suffixes. None contains "weight", "scale", "zero", "bias" or "offset", which vLLM and
#: Transformers match as substrings.
SUFFIXES: tuple[str, str, str] = ("sp_values", "sp_meta", "sp_rowsel")

#: Value dtypes the format stores.
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# Mask bitset of a group of 4 (bit j = position j kept) -> the two stored positions. Groups with fewer than two
# kept positions are padded with the lowest unused positions (their stored values are zero). -1 marks bitsets
# with more than two positions, which break 2:4.
_POSITIONS_OF_BITSET = torch.full((16, 2), -1, dtype=torch.int64)
for _bits in range(16):
    _kept = [j for j in range(4) if _bits >> j & 1]
    if len(_kept) <= 2:
        _kept += [j for j in range(4) if j not in _kept][: 2 - len(_kept)]
        _POSITIONS_OF_BITSET[_bits] = torch.tensor(sorted(_kept))


def packed_shapes(
    pattern: SparsityPattern, n_out: int, n_in: int, lead: tuple[int, ...] = ()
) -> dict[str, tuple[int, ...]]:
    """Shapes of the canonical tensors of a dense ``[*lead, O, I]`` weight, keyed by checkpoint suffix.

    Raises
    ------
    ValueError
        If ``[O, I]`` does not tile by the pattern.
    """
    pattern.check_shape(n_out, n_in)
    kept = n_out // pattern.row_group
    shapes = {"sp_values": (*lead, kept, n_in // 2), "sp_meta": (*lead, kept, n_in // META_SPAN)}
    if pattern.is_samoyeds:
        shapes["sp_rowsel"] = (*lead, n_out // 2, n_in // pattern.chunk)
    return shapes


@dataclass(frozen=True)
class PackedWeight:
    """One weight (or a stack of expert weights) in the canonical packed layout.

    Attributes
    ----------
    pattern:
        The sparsity pattern the tensors encode.
    values:
        ``[..., R, I/2]`` in bf16, fp16 or fp32; ``R = O`` for 2:4 and ``O/2`` for samoyeds.
    meta:
        ``[..., R, I/8]`` uint8, two groups of 4 per byte, low nibble first.
    rowsel:
        ``[..., O/2, I/V]`` uint8 in {0, 1} for samoyeds; None for 2:4.
    """

    pattern: SparsityPattern
    values: torch.Tensor
    meta: torch.Tensor
    rowsel: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        """O of the dense weight."""
        return self.values.shape[-2] * self.pattern.row_group

    @property
    def in_features(self) -> int:
        """I of the dense weight."""
        return self.values.shape[-1] * 2

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of ``unpack(self)``: leading dims, then ``(O, I)``."""
        return (*self.values.shape[:-2], self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Exact stored bytes of all tensors (no padding exists in the format)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors keyed by checkpoint suffix (``sp_rowsel`` only for samoyeds)."""
        out = {"sp_values": self.values, "sp_meta": self.meta}
        if self.rowsel is not None:
            out["sp_rowsel"] = self.rowsel
        return out

    @classmethod
    def from_tensors(
        cls, pattern: str | SparsityPattern, tensors: dict[str, torch.Tensor], name: str = "weight"
    ) -> PackedWeight:
        """Build from a suffix-keyed dict (as read from a checkpoint) and validate it."""
        pattern = parse_pattern(pattern)
        needed = SUFFIXES if pattern.is_samoyeds else SUFFIXES[:2]
        missing = [s for s in needed if s not in tensors]
        if missing:
            raise ValueError(f"{name}: pattern {pattern} needs tensors {list(needed)}, missing {missing}")
        packed = cls(pattern, tensors["sp_values"], tensors["sp_meta"], tensors.get("sp_rowsel"))
        validate(packed, name=name)
        return packed

    def slice_out_features(self, start: int, stop: int) -> PackedWeight:
        """Rows ``[start, stop)`` of the dense weight (tensor-parallel split of w13), as plain tensor slices.

        Raises
        ------
        ValueError
            If ``start``/``stop`` cut a row pair (samoyeds) or fall outside ``[0, O]``.
        """
        g = self.pattern.row_group
        _check_slice("out_features", start, stop, self.out_features, g, "row pairs" if g == 2 else "rows")
        rows = slice(start // g, stop // g)
        rowsel = None if self.rowsel is None else self.rowsel[..., start // 2 : stop // 2, :]
        return PackedWeight(self.pattern, self.values[..., rows, :], self.meta[..., rows, :], rowsel)

    def slice_in_features(self, start: int, stop: int) -> PackedWeight:
        """Columns ``[start, stop)`` of the dense weight (tensor-parallel split of w2), as plain slices.

        Raises
        ------
        ValueError
            If ``start``/``stop`` cut a chunk of V (samoyeds) or a metadata byte (8 columns, 2:4).
        """
        m = self.pattern.col_multiple
        _check_slice("in_features", start, stop, self.in_features, m, f"blocks of {m} columns")
        values = self.values[..., start // 2 : stop // 2]
        meta = self.meta[..., start // META_SPAN : stop // META_SPAN]
        rowsel = None
        if self.rowsel is not None:
            rowsel = self.rowsel[..., start // self.pattern.chunk : stop // self.pattern.chunk]
        return PackedWeight(self.pattern, values, meta, rowsel)

    def to(self, *args, **kwargs) -> PackedWeight:
        """Move the tensors (``values`` may change dtype; ``meta``/``rowsel`` stay uint8)."""
        values = self.values.to(*args, **kwargs)
        device = values.device
        rowsel = None if self.rowsel is None else self.rowsel.to(device)
        return PackedWeight(self.pattern, values, self.meta.to(device), rowsel)


def _check_slice(what: str, start: int, stop: int, size: int, multiple: int, unit: str) -> None:
    if not 0 <= start < stop <= size:
        raise ValueError(f"slice of {what} [{start}, {stop}) is outside [0, {size})")
    if start % multiple or stop % multiple:
        raise ValueError(f"slice of {what} [{start}, {stop}) must be whole {unit}: both ends multiples of {multiple}")


def _check_dense(weight: torch.Tensor, mask: torch.Tensor, pattern: SparsityPattern) -> None:
    if weight.dtype not in VALUE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in VALUE_DTYPES)
        raise TypeError(f"pack: weight dtype {weight.dtype} is not supported; use one of {names}")
    if mask.dtype != torch.bool:
        raise TypeError(f"pack: mask must be torch.bool, got {mask.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"pack: weight must be [..., O, I], got shape {tuple(weight.shape)}")
    if mask.shape != weight.shape:
        raise ValueError(f"pack: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    pattern.check_shape(weight.shape[-2], weight.shape[-1])


def _pack_two_four(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-compress rows of ``[..., R, I]``; returns values ``[..., R, I/2]`` and meta ``[..., R, I/8]``."""
    lead, n_in = weight.shape[:-1], weight.shape[-1]
    groups = mask.reshape(*lead, n_in // 4, 4)
    bitset = (groups.to(torch.uint8) << torch.arange(4, dtype=torch.uint8, device=mask.device)).sum(
        -1, dtype=torch.uint8
    )
    positions = _POSITIONS_OF_BITSET.to(mask.device)[bitset.long()]  # [..., G, 2]
    bad = positions[..., 0] < 0
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        *rows, group = first
        raise ValueError(
            f"pack: mask breaks 2:4 at index {(*rows, group * 4)}: more than 2 of the 4 inputs "
            f"[{group * 4}, {group * 4 + 4}) are kept"
        )
    masked = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    values = masked.reshape(*lead, n_in // 4, 4).gather(-1, positions).reshape(*lead, n_in // 2)
    nibble = (positions[..., 0] | positions[..., 1] << 2).to(torch.uint8).reshape(*lead, n_in // 8, 2)
    meta = nibble[..., 0] | nibble[..., 1] << 4
    return values.contiguous(), meta.contiguous()


def _unpack_two_four(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_two_four``: ``[..., R, I]`` dense rows."""
    lead, half = values.shape[:-1], values.shape[-1]
    nibble = torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(*lead, half // 2)  # [..., G]
    positions = torch.stack((nibble & 0x3, nibble >> 2), dim=-1).long()  # [..., G, 2]
    dense = torch.zeros(*lead, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(*lead, half // 2, 2))
    return dense.reshape(*lead, half * 2)


def pack(weight: torch.Tensor, mask: torch.Tensor, pattern: str | SparsityPattern) -> PackedWeight:
    """Pack the kept entries of ``weight`` into the canonical layout.

    Parameters
    ----------
    weight:
        ``[..., O, I]`` in bf16, fp16 or fp32 (leading dims: stacked experts).
    mask:
        ``[..., O, I]`` bool, True where the weight is kept; must satisfy ``pattern``.
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"`` (string or parsed).

    Returns
    -------
    PackedWeight
        ``unpack(result) == weight * mask`` exactly.

    Raises
    ------
    ValueError
        If the shape does not tile by the pattern or the mask breaks it (the first bad index is named).
    TypeError
        For an unsupported weight dtype or a non-bool mask.
    """
    pattern = parse_pattern(pattern)
    _check_dense(weight, mask, pattern)
    if not pattern.is_samoyeds:
        values, meta = _pack_two_four(weight, mask)
        return PackedWeight(pattern, values, meta)

    *lead, n_out, n_in = weight.shape
    v = pattern.chunk
    pair_shape = (*lead, n_out // 2, 2, n_in // v, v)
    row_has = mask.reshape(pair_shape).any(-1)  # [..., P, 2, C]
    both = row_has[..., 0, :] & row_has[..., 1, :]
    if both.any():
        *rows, pair, chunk = (int(i) for i in both.nonzero()[0])
        raise ValueError(
            f"pack: mask breaks {pattern} at index {(*rows, 2 * pair, chunk * v)}: rows {2 * pair} and "
            f"{2 * pair + 1} both keep entries in chunk [{chunk * v}, {(chunk + 1) * v})"
        )
    rowsel = row_has[..., 1, :]  # [..., P, C]; pairs with no kept entry select row 0
    pick = rowsel[..., None, :, None]
    w = weight.reshape(pair_shape)
    m = mask.reshape(pair_shape)
    seg_w = torch.where(pick, w[..., 1:2, :, :], w[..., 0:1, :, :]).reshape(*lead, n_out // 2, n_in)
    seg_m = torch.where(pick, m[..., 1:2, :, :], m[..., 0:1, :, :]).reshape(*lead, n_out // 2, n_in)
    values, meta = _pack_two_four(seg_w, seg_m)
    return PackedWeight(pattern, values, meta, rowsel.to(torch.uint8).contiguous())


def unpack(packed: PackedWeight) -> torch.Tensor:
    """Expand to the dense ``[..., O, I]`` weight (zeros where pruned), in the values' dtype and device."""
    segments = _unpack_two_four(packed.values, packed.meta)
    if not packed.pattern.is_samoyeds:
        return segments
    *lead, pairs, n_in = segments.shape
    v = packed.pattern.chunk
    seg = segments.reshape(*lead, pairs, 1, n_in // v, v)
    owner = packed.rowsel.reshape(*lead, pairs, 1, n_in // v, 1).to(torch.int64)
    row = torch.arange(2, device=seg.device).reshape(2, 1, 1)
    dense = torch.where(owner == row, seg, torch.zeros((), dtype=seg.dtype, device=seg.device))
    return dense.reshape(*lead, pairs * 2, n_in)


def _first_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def validate(packed: PackedWeight, name: str = "weight") -> None:
    """Check every invariant of the canonical layout.

    Checks shapes and dtypes of all tensors against each other and the pattern, that every group's two
    positions are strictly ascending (``p0 < p1``), and that every row selection is 0 or 1.

    Raises
    ------
    ValueError
        Naming the tensor (``{name}.sp_meta`` ...) and the first bad index.
    TypeError
        For a wrong dtype.
    """
    pattern, values, meta, rowsel = packed.pattern, packed.values, packed.meta, packed.rowsel
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"{name}.sp_values: dtype {values.dtype} not in {[str(d) for d in VALUE_DTYPES]}")
    for suffix, t in (("sp_meta", meta), ("sp_rowsel", rowsel)):
        if t is not None and t.dtype != torch.uint8:
            raise TypeError(f"{name}.{suffix}: dtype must be torch.uint8, got {t.dtype}")
    if values.dim() < 2:
        raise ValueError(f"{name}.sp_values: expected [..., R, I/2], got shape {tuple(values.shape)}")
    pattern.check_shape(packed.out_features, packed.in_features, name=name)
    lead, kept_rows, n_in = values.shape[:-2], values.shape[-2], packed.in_features
    expect_meta = (*lead, kept_rows, n_in // META_SPAN)
    if tuple(meta.shape) != expect_meta:
        raise ValueError(
            f"{name}.sp_meta: expected shape {expect_meta} for sp_values {tuple(values.shape)}, got {tuple(meta.shape)}"
        )
    if meta.device != values.device:
        raise ValueError(f"{name}.sp_meta is on {meta.device} but sp_values on {values.device}")
    if pattern.is_samoyeds:
        if rowsel is None:
            raise ValueError(f"{name}.sp_rowsel: required by pattern {pattern}, missing")
        expect_rowsel = (*lead, kept_rows, n_in // pattern.chunk)
        if tuple(rowsel.shape) != expect_rowsel:
            raise ValueError(
                f"{name}.sp_rowsel: expected shape {expect_rowsel} for pattern {pattern}, got {tuple(rowsel.shape)}"
            )
        if rowsel.device != values.device:
            raise ValueError(f"{name}.sp_rowsel is on {rowsel.device} but sp_values on {values.device}")
        bad = rowsel > 1
        if bad.any():
            idx = _first_index(bad)
            raise ValueError(f"{name}.sp_rowsel: value {int(rowsel[idx])} at index {idx} is not 0 or 1")
    elif rowsel is not None:
        raise ValueError(f"{name}.sp_rowsel: pattern 2:4 has no row selection, but one was given")
    nibbles = torch.stack((meta & 0xF, meta >> 4), dim=-1).flatten(-2)  # [..., R, G]
    bad = (nibbles & 0x3) >= (nibbles >> 2)
    if bad.any():
        idx = _first_index(bad)
        nib, group = int(nibbles[idx]), idx[-1]
        raise ValueError(
            f"{name}.sp_meta: group {group} of row {idx[:-1]} (byte {group // 2}, inputs "
            f"[{group * 4}, {group * 4 + 4})) holds positions ({nib & 3}, {nib >> 2}); they must be strictly "
            "ascending"
        )
