"""The samoyeds:: reference ops equal a dense computation on the masked weights."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from samoyeds_vllm import ops
from samoyeds_vllm.formats import SUPPORTED_CHUNKS, pack, parse_pattern, unpack
from samoyeds_vllm.pruning import select_mask

PATTERNS = ["2:4", *[f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS]]


def _packed_experts(n_experts, n_out, n_in, pattern, dtype, gen):
    w = (torch.randn(n_experts, n_out, n_in, generator=gen) / n_in**0.5).to(dtype)
    return pack(w, select_mask(w.abs(), pattern), pattern)


def _dense_moe(x, topk_weights, topk_ids, w13, w2, expert_map=None):
    """Token-by-token float64 MoE on the dense masked weights (independent of the op's expert loop)."""
    w13d, w2d = unpack(w13).double(), unpack(w2).double()
    inter = w2d.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            h = w13d[e] @ x[t].double()
            act = F.silu(h[:inter]) * h[inter:]
            out[t] += float(topk_weights[t, j]) * (w2d[e] @ act)
    return out


def _routing(kind, n_tokens, n_experts, topk, gen):
    if kind == "uniform":
        ids = torch.stack([torch.randperm(n_experts, generator=gen)[:topk] for _ in range(n_tokens)])
    elif kind == "one_expert":  # every token's first slot goes to expert 0
        ids = torch.stack([torch.randperm(n_experts, generator=gen)[:topk] for _ in range(n_tokens)])
        ids[:, 0] = 0
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, n_experts - 1, ids[:, 1:]) if n_experts > 1 else 0
    else:  # "skewed": only the first two experts receive tokens
        ids = torch.randint(0, min(2, n_experts), (n_tokens, topk), generator=gen)
    weights = torch.softmax(torch.randn(n_tokens, topk, generator=gen), dim=-1)
    return weights, ids.to(torch.int32)


@given(
    pattern=st.sampled_from(PATTERNS),
    n_tokens=st.sampled_from([1, 3, 17]),
    n_experts=st.integers(1, 6),
    topk=st.integers(1, 3),
    routing=st.sampled_from(["uniform", "one_expert", "skewed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_moe_reference_equals_dense_masked_moe(pattern, n_tokens, n_experts, topk, routing, seed):
    topk = min(topk, n_experts)
    gen = torch.Generator().manual_seed(seed)
    hidden = inter = max(64, parse_pattern(pattern).col_multiple)  # smallest legal sizes for the pattern
    w13 = _packed_experts(n_experts, 2 * inter, hidden, pattern, torch.float32, gen)
    w2 = _packed_experts(n_experts, hidden, inter, pattern, torch.float32, gen)
    x = torch.randn(n_tokens, hidden, generator=gen)
    weights, ids = _routing(routing, n_tokens, n_experts, topk, gen)
    out = ops.moe_sparse(x, weights, ids, w13, w2)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), _dense_moe(x, weights, ids, w13, w2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_reference_half_precision_rounds_once(dtype):
    gen = torch.Generator().manual_seed(0)
    w13 = _packed_experts(4, 128, 64, "1:2:32+2:4", dtype, gen)
    w2 = _packed_experts(4, 64, 64, "1:2:32+2:4", dtype, gen)
    x = torch.randn(9, 64, generator=gen).to(dtype)
    weights, ids = _routing("uniform", 9, 4, 2, gen)
    out = ops.moe_sparse(x, weights, ids, w13, w2)
    assert out.dtype == dtype
    expected = _dense_moe(x, weights, ids, w13, w2)
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=0, atol=0)


def test_expert_map_skips_other_ranks_experts():
    """EP: this rank owns global experts 1 and 3 (local 0 and 1); the rest contribute nothing."""
    gen = torch.Generator().manual_seed(1)
    w13 = _packed_experts(2, 64, 64, "2:4", torch.float32, gen)
    w2 = _packed_experts(2, 64, 32, "2:4", torch.float32, gen)
    expert_map = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    x = torch.randn(12, 64, generator=gen)
    weights, ids = _routing("uniform", 12, 4, 2, gen)
    out = ops.moe_sparse(x, weights, ids, w13, w2, expert_map=expert_map)
    torch.testing.assert_close(out.double(), _dense_moe(x, weights, ids, w13, w2, expert_map), rtol=1e-5, atol=1e-6)
    untouched = ~((ids == 1) | (ids == 3)).any(-1)
    assert untouched.any() and (out[untouched] == 0).all()


def test_zero_tokens():
    gen = torch.Generator().manual_seed(2)
    w13 = _packed_experts(3, 64, 32, "2:4", torch.float32, gen)
    w2 = _packed_experts(3, 32, 32, "2:4", torch.float32, gen)
    out = ops.moe_sparse(torch.empty(0, 32), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32), w13, w2)
    assert out.shape == (0, 32)


@pytest.mark.parametrize("pattern", ["2:4", "1:2:64+2:4"])
def test_linear_reference_equals_dense(pattern):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=gen)
    packed = pack(w, select_mask(w.abs(), pattern), pattern)
    x = torch.randn(2, 5, 128, generator=gen)
    torch.testing.assert_close(ops.linear_sparse(x, packed), x @ unpack(packed).t(), rtol=1e-5, atol=1e-5)


def _moe_args(pattern="1:2:32+2:4", n_tokens=5):
    gen = torch.Generator().manual_seed(4)
    w13 = _packed_experts(3, 128, 64, pattern, torch.float32, gen)
    w2 = _packed_experts(3, 64, 64, pattern, torch.float32, gen)
    weights, ids = _routing("uniform", n_tokens, 3, 2, gen)
    x = torch.randn(n_tokens, 64, generator=gen)
    return [x, weights, ids, w13.values, w13.meta, w13.rowsel, w2.values, w2.meta, w2.rowsel, ops.chunk_of(w13), None]


@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4"])
def test_opcheck(pattern):
    torch.library.opcheck(torch.ops.samoyeds.moe_sparse, tuple(_moe_args(pattern)))
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=gen)
    packed = pack(w, select_mask(w.abs(), pattern), pattern)
    torch.library.opcheck(
        torch.ops.samoyeds.linear_sparse,
        (torch.randn(3, 64), packed.values, packed.meta, packed.rowsel, packed.pattern.chunk),
    )


def test_torch_compile_traces_the_op_without_graph_breaks():
    args = _moe_args()
    compiled = torch.compile(lambda x: torch.ops.samoyeds.moe_sparse(x, *args[1:]), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(args[0]), torch.ops.samoyeds.moe_sparse(*args))


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, torch.randn(5, 32), "hidden size mismatch"),
        (0, torch.randn(5, 64).double(), "x dtype"),
        (0, torch.randn(5, 1, 64), r"x must be \[T, H\]"),
        (1, torch.rand(4, 2), "must both be"),
        (2, torch.zeros(5, 2), "int32 or int64"),
        (5, None, "w13_rowsel is required"),
        (7, torch.zeros(3, 32, 8, dtype=torch.int32), "w2_meta must be uint8"),
        (9, 64, "w13_rowsel must be uint8"),
        (9, 48, "chunk=48"),
        (10, torch.zeros(3, 3, dtype=torch.int32), "expert_map must be a 1-D"),
    ],
)
def test_moe_op_errors_name_the_argument(index, value, message):
    args = _moe_args()
    args[index] = value
    with pytest.raises(ValueError, match=message):
        torch.ops.samoyeds.moe_sparse(*args)
    with pytest.raises(ValueError, match=message), torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.ops.samoyeds.moe_sparse(*fake)


def test_moe_wrapper_rejects_mixed_patterns():
    gen = torch.Generator().manual_seed(6)
    w13 = _packed_experts(2, 64, 64, "2:4", torch.float32, gen)
    w2 = _packed_experts(2, 64, 32, "1:2:32+2:4", torch.float32, gen)
    with pytest.raises(ValueError, match="w13 pattern 2:4 != w2 pattern 1:2:32"):
        ops.moe_sparse(torch.randn(1, 64), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), w13, w2)
