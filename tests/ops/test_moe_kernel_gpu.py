"""CUDA kernel of samoyeds::moe_sparse_prepacked vs the exact reference, on fresh random cases (GPU only)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from samoyeds_vllm import ops
from samoyeds_vllm.formats import pack
from samoyeds_vllm.ops.cuda_kernels import cuda_kernels_available
from samoyeds_vllm.ops.reference import moe_dense_reference
from samoyeds_vllm.pruning import select_mask

pytestmark = pytest.mark.gpu

# Relative error budget: the kernel rounds the SwiGLU intermediate and each slot's output to the activation
# dtype (as vLLM's fused MoE does); the reference keeps fp32 until the end.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
PATTERNS = ["2:4", "1:2:32+2:4", "1:2:64+2:4", "1:2:128+2:4", "1:2:256+2:4"]


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs an sm_80+ GPU")
    assert cuda_kernels_available(), "CUDA kernels failed to build (see the log)"


def _experts(n_exp, n_out, n_in, pattern, dtype, gen):
    w = torch.randn(n_exp, n_out, n_in, generator=gen, device="cuda") / n_in**0.5
    return pack(w.to(dtype), select_mask(w.abs(), pattern), pattern)


def _routing(kind, n_tokens, n_exp, topk, gen):
    scores = torch.rand(n_tokens, n_exp, generator=gen, device="cuda")
    if kind == "one_expert":
        scores[:, 0] = 2.0
    elif kind == "skewed":  # Zipf-like popularity: a few experts get most tokens, many get none
        scores = scores * (1.0 / torch.arange(1, n_exp + 1, device="cuda")) ** 2
    ids = scores.topk(topk, dim=-1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(n_tokens, topk, generator=gen, device="cuda"), -1)
    return weights, ids


def _poison_allocator(nbytes: int) -> None:
    """Fill soon-to-be-reused allocator blocks with NaN, so any output the kernel forgets to write shows up."""
    torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device="cuda").fill_(float("nan"))


def _check(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in kernel output"
    err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    scale = ref.float().abs().max().clamp_min(1e-6)
    worst = ((out.float() - ref.float()).abs().max() / scale).item()
    assert worst < 8 * TOLERANCE[dtype], f"{what}: worst element off by {worst:.2e} of max|ref|"


def _run_case(pattern, dtype, n_tokens, n_exp, topk, hidden, inter, routing, seed, expert_map=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = _experts(n_exp, 2 * inter, hidden, pattern, dtype, gen)
    w2 = _experts(n_exp, hidden, inter, pattern, dtype, gen)
    x = torch.randn(n_tokens, hidden, generator=gen, device="cuda").to(dtype)
    n_global = 2 * n_exp if expert_map else n_exp
    weights, ids = _routing(routing, n_tokens, n_global, topk, gen)
    emap = None
    if expert_map:  # this rank owns the odd global experts
        emap = torch.full((n_global,), -1, dtype=torch.int32, device="cuda")
        emap[1::2] = torch.arange(n_exp, dtype=torch.int32, device="cuda")
    prepared = ops.prepare_moe_weights(w13, w2)
    assert prepared.kernel_layout
    ref = ops.moe_sparse(x, weights, ids, w13, w2, expert_map=emap)  # exact reference (fp32 math)
    _poison_allocator(4 * n_tokens * hidden * topk * 4 + (1 << 22))
    out = ops.moe_forward(x, weights, ids, prepared, expert_map=emap)
    torch.cuda.synchronize()
    _check(out, ref, dtype, f"{pattern} {dtype} T={n_tokens} E={n_exp} k={topk} H={hidden} I={inter} {routing}")
    return prepared, x, weights, ids, emap, ref


# Shapes: tails others got wrong (1408, 2304, 5760), tiny and decode-to-prefill token counts.
# 352 / 416 (11 / 13 k-steps): the last k-block of the pipelined kernels (2 or 4 k-steps) is partial, as for
# I / TP = 704 (DeepSeek-V2-Lite, Qwen2-MoE at TP = 2); no earlier shape exercised that path.
SHAPES = [(256, 128), (512, 768), (1024, 1408), (256, 2304), (512, 5760), (2048, 768), (352, 416)]


def _random_cases(count: int, seed: int = 20261121):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        pattern = PATTERNS[i % len(PATTERNS)]
        hidden, inter = rng.choice(SHAPES)
        v = int(pattern.split(":")[2].split("+")[0]) if pattern != "2:4" else 32
        if inter % v or hidden % v:  # V=256 does not tile 1408 or 5760: use the nearest shape it tiles
            hidden, inter = 1024, 1280
        n_exp = rng.choice([1, 2, 8, 16, 64, 128])
        topk = rng.randint(1, min(8, n_exp))
        n_tokens = rng.choice([1, 2, 5, 8, 13, 32, 64, 100, 128, 512])
        if n_exp >= 64 and inter > 1408:
            inter = 768  # keep memory and reference time reasonable
        routing = rng.choice(["uniform", "uniform", "skewed", "one_expert"])
        dtype = torch.bfloat16 if i % 3 else torch.float16
        cases.append((pattern, dtype, n_tokens, n_exp, topk, hidden, inter, routing, 1000 + i))
    return cases


@pytest.mark.parametrize("case", _random_cases(200), ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-T{c[2]}-E{c[3]}-k{c[4]}")
def test_kernel_matches_reference_random(case):
    _run_case(*case)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens", [1, 7, 2048, 8192])
def test_kernel_matches_reference_decode_to_prefill(pattern, n_tokens):
    _run_case(pattern, torch.bfloat16, n_tokens, 8, 2, 1024, 1408 if pattern != "1:2:256+2:4" else 1280, "uniform", 7)


@pytest.mark.parametrize(
    ("pattern", "n_tokens", "hidden", "inter"),
    [
        ("1:2:64+2:4", 64, 704, 704),  # 22 k-steps: partial last k-block with a chunk start inside it
        ("1:2:64+2:4", 8, 704, 704),  # the same on the decode tile
        ("2:4", 128, 256, 4128),  # w2: 129 k-steps split over grid.z, the last split ending in a partial block
        ("1:2:32+2:4", 128, 256, 4128),
        ("2:4", 8, 256, 4128),  # w2 on the split-K decode kernel (K >= 2048): its last k-block is partial
        ("1:2:32+2:4", 8, 256, 4128),
    ],
)
def test_kernel_matches_reference_k_tails(pattern, n_tokens, hidden, inter):
    """K not a multiple of the pipeline's k-block, alone and with K splits (I / TP = 704 occurs in practice)."""
    _run_case(pattern, torch.bfloat16, n_tokens, 8, 2, hidden, inter, "uniform", 5)


@pytest.mark.parametrize(
    ("pattern", "dtype", "n_tokens", "n_exp", "hidden", "inter", "routing"),
    [
        # 13 m-tiles per group: the last CTA (4 m-tiles) has 3 idle warps; K tails in both GEMMs; experts of ~50
        # tokens overflow into a second, partly filled tile
        ("1:2:32+2:4", torch.bfloat16, 200, 8, 352, 416, "uniform"),
        ("1:2:128+2:4", torch.float16, 150, 8, 1024, 1408, "skewed"),  # several tiles per busy expert, empty experts
        ("1:2:256+2:4", torch.bfloat16, 100, 4, 512, 1280, "one_expert"),
        ("1:2:64+2:4", torch.float16, 60, 2, 256, 768, "uniform"),  # one expert gets 33-64 tokens
    ],
)
def test_kernel_matches_reference_wide_tiles(pattern, dtype, n_tokens, n_exp, hidden, inter, routing):
    """1:2:V+2:4 where the busiest experts overflow the 32-token tile (the wide-tile rule of dispatch_tiles)."""
    _run_case(pattern, dtype, n_tokens, n_exp, 2, hidden, inter, routing, 17)


@pytest.mark.parametrize("pattern", ["2:4", "1:2:128+2:4"])
def test_kernel_expert_parallel_map(pattern):
    _run_case(pattern, torch.bfloat16, 33, 8, 4, 512, 768, "uniform", 11, expert_map=True)


@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4"])
def test_cuda_graph_replay_equals_eager(pattern):
    prepared, x, weights, ids, _, _ = _run_case(pattern, torch.bfloat16, 16, 16, 4, 512, 768, "uniform", 5)
    eager = ops.moe_forward(x, weights, ids, prepared)
    static_x, static_w, static_ids = x.clone(), weights.clone(), ids.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.moe_forward(static_x, static_w, static_ids, prepared)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.moe_forward(static_x, static_w, static_ids, prepared)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # New routing through the same graph: the plan is rebuilt on the device, no host sync.
    gen = torch.Generator(device="cuda").manual_seed(99)
    new_w, new_ids = _routing("skewed", 16, 16, 4, gen)
    static_w.copy_(new_w)
    static_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, ops.moe_forward(x, new_w, new_ids, prepared))


def test_kernel_is_deterministic():
    prepared, x, weights, ids, _, _ = _run_case("1:2:64+2:4", torch.bfloat16, 300, 8, 2, 512, 768, "skewed", 3)
    first = ops.moe_forward(x, weights, ids, prepared)
    for _ in range(3):
        assert torch.equal(ops.moe_forward(x, weights, ids, prepared), first)


def test_nan_input_stays_in_its_token():
    prepared, x, weights, ids, _, _ = _run_case("1:2:32+2:4", torch.bfloat16, 9, 4, 2, 256, 256, "uniform", 4)
    x = x.clone()
    x[3, 5] = float("nan")
    out = ops.moe_forward(x, weights, ids, prepared)
    assert torch.isnan(out[3]).any()
    assert not torch.isnan(out[torch.arange(9, device="cuda") != 3]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n_tokens", "n_exp", "topk", "hidden", "inter", "routing"),
    [
        (1, 8, 2, 512, 768, "uniform"),
        (7, 16, 4, 256, 1408, "skewed"),
        (33, 8, 2, 512, 768, "one_expert"),
        (300, 64, 8, 256, 256, "uniform"),
        (2048, 8, 2, 1024, 1408, "uniform"),
        (40, 8, 2, 352, 416, "uniform"),  # K tails in both GEMMs
    ],
)
def test_dense_control_matches_reference(dtype, n_tokens, n_exp, topk, hidden, inter, routing):
    """The fusion control (our kernels on dense weights) computes the same MoE as the dense reference."""
    gen = torch.Generator(device="cuda").manual_seed(n_tokens)
    w13 = (torch.randn(n_exp, 2 * inter, hidden, generator=gen, device="cuda") / hidden**0.5).to(dtype)
    w2 = (torch.randn(n_exp, hidden, inter, generator=gen, device="cuda") / inter**0.5).to(dtype)
    x = torch.randn(n_tokens, hidden, generator=gen, device="cuda").to(dtype)
    weights, ids = _routing(routing, n_tokens, n_exp, topk, gen)
    prepared = ops.prepare_dense_control(w13, w2)
    ref = moe_dense_reference(x, weights, ids, w13, w2)
    _poison_allocator(4 * n_tokens * hidden * topk * 4 + (1 << 22))
    out = ops.moe_dense_control(x, weights, ids, prepared)
    torch.cuda.synchronize()
    _check(out, ref, dtype, f"dense control {dtype} T={n_tokens} E={n_exp} k={topk} H={hidden} I={inter} {routing}")


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# Every check of this file again, in a fresh process, with every sparse call on one family of Hopper kernels.
FORCED_PASSES = {
    "wgmma": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "0"},  # wgmma.sp; 1:2:V+2:4 with accumulator banks
    "wgmma_expand": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "2"},  # 1:2:V+2:4 with its row pairs expanded
    # one token tile each (the "wgmma" pass picks 32, 48, 64 or, for 2:4, 128 by the pairs per expert)
    "wgmma_tile32": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "0", "SAMOYEDS_WG_TOKEN_TILE": "32"},
    "wgmma_tile48": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "0", "SAMOYEDS_WG_TOKEN_TILE": "48"},
    "wgmma_tile64": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "0", "SAMOYEDS_WG_TOKEN_TILE": "64"},
    # work items rastered in blocks of one or two token tiles (the default blocks hold every tile of these shapes)
    "wgmma_raster": {"SAMOYEDS_WGMMA": "2", "SAMOYEDS_WG_EXPAND": "0", "SAMOYEDS_WG_RASTER_KB": "64"},
}
FORCED = os.environ.get("SAMOYEDS_TEST_FORCED_PASS")


@pytest.mark.skipif(not HOPPER, reason="the wgmma.sp path is Hopper (sm_90a) only")
@pytest.mark.skipif(FORCED is not None, reason="runs the forced passes itself")
@pytest.mark.parametrize("name", sorted(FORCED_PASSES))
def test_forced_pass_passes_every_check(name):
    env = {**os.environ, **FORCED_PASSES[name], "SAMOYEDS_TEST_FORCED_PASS": name}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not HOPPER or FORCED is None, reason="forced wgmma.sp passes only")
@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4"])
def test_wgmma_kernels_ran(pattern):
    """The forced pass really ran the wgmma.sp kernels it names (the kernel names in a profile of one call)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    w13 = _experts(4, 2 * 416, 352, pattern, torch.bfloat16, gen)
    w2 = _experts(4, 352, 416, pattern, torch.bfloat16, gen)
    prepared = ops.prepare_moe_weights(w13, w2)
    x = torch.randn(40, 352, generator=gen, device="cuda", dtype=torch.bfloat16)
    weights, ids = _routing("uniform", 40, 4, 2, gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.moe_forward(x, weights, ids, prepared)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    samoyeds = pattern != "2:4"
    expand = samoyeds and FORCED == "wgmma_expand"
    # token tile: expanded 64, else forced or by the pairs per expert (20 pairs + 2 sd: 32)
    tile = 64 if expand else int(os.environ.get("SAMOYEDS_WG_TOKEN_TILE") or 32)
    for groups in (1, 2):  # w2, w13; template arguments <T, G, SAMOYEDS, EXPAND, BN>
        flags = f"{str(samoyeds).lower()}, {str(expand).lower()}, {tile}>"
        want = f"moe_wgmma_sp_kernel<__nv_bfloat16, {groups}, {flags}"
        assert any(want in n for n in names), (want, sorted(names))
