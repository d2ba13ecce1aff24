"""Fusion control op (samoyeds::moe_dense_prepacked): dense kernel layout and the CPU reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samoyeds_vllm import ops
from samoyeds_vllm.ops.kernel_layout import from_dense_kernel_layout, to_dense_kernel_layout


def test_dense_kernel_layout_round_trip_and_lane_order():
    w = torch.randn(2, 64, 96)
    kl = to_dense_kernel_layout(w, 2)
    assert kl.shape == (2, 2, 2, 3, 32, 16)
    assert torch.equal(from_dense_kernel_layout(kl), w)
    # lane 4g + t, half h, fragment register q, value pair -> row g + 8 (q & 1), col 16h + 2t + 8 (q >> 1) + pair
    e, mt, grp, s, g, t, h, q, pair = 1, 1, 1, 2, 5, 3, 1, 2, 1
    row = grp * 32 + mt * 16 + g + 8 * (q & 1)
    col = 32 * s + 16 * h + 2 * t + 8 * (q >> 1) + pair
    assert kl[e, mt, grp, s, 4 * g + t, 8 * h + 2 * q + pair] == w[e, row, col]


def test_dense_kernel_layout_rejects_untileable():
    with pytest.raises(ValueError, match="R % 32 == 0"):
        to_dense_kernel_layout(torch.randn(1, 48, 64), 2)


def test_moe_dense_control_matches_token_by_token_math():
    gen = torch.Generator().manual_seed(0)
    n_exp, hidden, inter, n_tokens, topk = 4, 64, 32, 9, 2
    w13 = torch.randn(n_exp, 2 * inter, hidden, generator=gen, dtype=torch.float64).float()
    w2 = torch.randn(n_exp, hidden, inter, generator=gen, dtype=torch.float64).float()
    x = torch.randn(n_tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(n_exp, generator=gen)[:topk] for _ in range(n_tokens)]).to(torch.int32)
    ids[:, 0] = 1  # every token visits expert 1; experts may get no tokens
    weights = torch.softmax(torch.randn(n_tokens, topk, generator=gen), -1)
    out = ops.moe_dense_control(x, weights, ids, ops.prepare_dense_control(w13, w2))
    expected = torch.zeros(n_tokens, hidden, dtype=torch.float64)
    for t in range(n_tokens):
        for j in range(topk):
            e = int(ids[t, j])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            expected[t] += weights[t, j].double() * (w2[e].double() @ (F.silu(gate) * up))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_moe_dense_control_rejects_canonical_weights():
    w13, w2 = torch.randn(2, 64, 64), torch.randn(2, 64, 32)
    with pytest.raises(ValueError, match="dense kernel layout"):
        torch.ops.samoyeds.moe_dense_prepacked(
            torch.randn(3, 64), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32), w13, w2, None
        )
