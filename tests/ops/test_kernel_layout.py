"""Kernel layout: a pure reordering of the canonical tensors, and the prepacked op equals the canonical one."""

import pytest
import torch

from samoyeds_vllm import ops
from samoyeds_vllm.formats import pack, unpack
from samoyeds_vllm.ops.kernel_layout import from_kernel_layout, kernel_layout_supported, to_kernel_layout
from samoyeds_vllm.pruning import select_mask

PATTERNS = ["2:4", "1:2:32+2:4", "1:2:64+2:4", "1:2:128+2:4"]


def _packed(shape, pattern, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    return pack(w, select_mask(w.abs(), pattern), pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("groups", [1, 2])
def test_round_trip_is_bitwise(pattern, groups):
    p = _packed((3, 128, 256), pattern)
    values, meta = to_kernel_layout(p, groups)
    back = from_kernel_layout(values, meta, p.pattern, p.rowsel)
    assert torch.equal(back.values, p.values) and torch.equal(back.meta, p.meta)


def test_fragment_order_matches_the_mma_sp_operand():
    """Lane l = 4g + t holds a0..a3 = (row g | g+8) x (stored cols 2t, 2t+1 | 2t+8, 2t+9)."""
    p = _packed((1, 32, 64), "2:4")
    values, meta = to_kernel_layout(p, 1)
    for g in range(8):
        for t in range(4):
            lane = values[0, 1, 0, 1, 4 * g + t]  # m-tile 1 (rows 16..31), k-step 1 (stored cols 16..31)
            rows = (16 + g, 16 + g + 8)
            expected = torch.cat(
                [p.values[0, rows[h], 16 + 8 * q + 2 * t : 16 + 8 * q + 2 * t + 2] for q in (0, 1) for h in (0, 1)]
            )
            assert torch.equal(lane, expected)
            word = lambda r: int.from_bytes(bytes(p.meta[0, r, 4:8].tolist()), "little")  # noqa: E731
            half = t & 1
            reg = ((word(rows[0]) >> 16 * half) & 0xFFFF) | ((word(rows[1]) >> 16 * half) & 0xFFFF) << 16
            assert int(meta[0, 1, 0, 1, 2 * g + half]) & 0xFFFFFFFF == reg


def test_unsupported_shapes_are_reported():
    assert not kernel_layout_supported(_packed((2, 24, 64), "2:4"), 1)  # 24 rows: not whole m-tiles
    assert not kernel_layout_supported(_packed((2, 32, 40), "2:4"), 1)  # I = 40: not whole k-steps
    assert not kernel_layout_supported(_packed((2, 32, 64), "1:2:32+2:4"), 2)  # 16 stored rows, 2 groups
    with pytest.raises(ValueError, match="kernel layout needs"):
        to_kernel_layout(_packed((2, 24, 64), "2:4"), 1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prepacked_op_equals_canonical_op_on_cpu(pattern):
    w13 = _packed((4, 2 * 128, 128), pattern, seed=1)
    w2 = _packed((4, 128, 128), pattern, seed=2)
    v13, m13 = to_kernel_layout(w13, 2)
    v2, m2 = to_kernel_layout(w2, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 128, generator=gen)
    weights = torch.rand(7, 2, generator=gen)
    ids = torch.randint(0, 4, (7, 2), generator=gen, dtype=torch.int32)
    prepared = ops.MoEWeights(w13.pattern.chunk, True, v13, m13, w13.rowsel, v2, m2, w2.rowsel)
    out = ops.moe_forward(x, weights, ids, prepared)
    assert torch.equal(out, ops.moe_sparse(x, weights, ids, w13, w2))
    args = (x, weights, ids, v13, m13, w13.rowsel, v2, m2, w2.rowsel, w13.pattern.chunk, None)
    torch.library.opcheck(torch.ops.samoyeds.moe_sparse_prepacked, args)


def test_prepare_keeps_canonical_tensors_on_cpu():
    w13, w2 = _packed((2, 64, 64), "2:4"), _packed((2, 64, 32), "2:4")
    prepared = ops.prepare_moe_weights(w13, w2)
    assert not prepared.kernel_layout and prepared.w13_values is w13.values
    x = torch.randn(3, 64)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    torch.testing.assert_close(
        ops.moe_forward(x, torch.ones(3, 1), ids, prepared),
        (torch.nn.functional.silu(x @ unpack(w13)[0, :32].t()) * (x @ unpack(w13)[0, 32:].t())) @ unpack(w2)[0].t(),
    )


def test_prepacked_op_rejects_canonical_tensors():
    w13, w2 = _packed((2, 64, 64), "2:4"), _packed((2, 64, 32), "2:4")
    with pytest.raises(ValueError, match=r"w13_values must be kernel layout"):
        torch.ops.samoyeds.moe_sparse_prepacked(
            torch.randn(1, 64),
            torch.ones(1, 1),
            torch.zeros(1, 1, dtype=torch.int32),
            w13.values,
            w13.meta,
            None,
            w2.values,
            w2.meta,
            None,
            0,
            None,
        )
