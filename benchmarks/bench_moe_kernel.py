"""MoE-layer time of the samoyeds kernels vs dense baselines, side by side in one process (BENCHMARKING.md).

For every (shape, tokens) the same inputs and routing feed every variant: our kernel for each sparse pattern
and, as the fusion control, on the dense weights themselves (pattern ``dense``),
vLLM's dense ``fused_experts`` (when vLLM is importable), and a dense grouped GEMM via ``torch._grouped_mm``.
Each variant is captured in a CUDA graph and timed by replaying it (median of CUDA-event timings); weights
are rotated over several copies when they would otherwise sit in L2. Bytes moved count each weight byte of
every expert that receives at least one token once (compressed bytes for sparse formats) plus activations.

Example::

    python benchmarks/bench_moe_kernel.py --shapes mixtral_8x7b qwen3_30b_a3b --tokens 1 8 32 64 128 2048 \\
        --patterns 2:4 1:2:128+2:4 1:2:32+2:4 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_env import git_commit, write_result

from samoyeds_vllm import ops
from samoyeds_vllm.formats import pack, parse_pattern
from samoyeds_vllm.pruning import select_mask

#: name -> (E, k, H, I) from DESIGN.md
SHAPES = {
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "qwen3_30b_a3b": (128, 8, 2048, 768),
    "olmoe": (64, 8, 2048, 1024),
    "deepseek_v2_lite": (64, 6, 2048, 1408),
    "qwen15_moe": (60, 4, 2048, 1408),
}
#: pattern name of the fusion control: our kernels on the dense weights
DENSE_CONTROL = "dense"
L2_ROTATION_BYTES = 512 << 20  # rotate weight copies until this many bytes are cycled (L2 is 50-60 MB)


def _median_us(fn: Callable[[], object], repeats: int, use_graph: bool) -> float:
    """Median time of ``fn`` in microseconds: CUDA graph replay (or eager calls) timed with CUDA events.

    A function that cannot be captured (e.g. one that synchronises with the host) is timed eagerly and
    reported once on stdout.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    run = fn
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except RuntimeError as err:
            print(f"  (not capturable, timed eagerly: {str(err).splitlines()[0][:80]})")
            torch.cuda.synchronize()
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write bytes / time) on a 2 GiB buffer."""
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    us = _median_us(lambda: dst.copy_(src), 20, use_graph=False)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e9


def _matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    us = _median_us(lambda: a @ b, 20, use_graph=False)
    return 2 * 8192**3 / (us * 1e-6) / 1e12


def uniform_routing(n_tokens: int, n_exp: int, topk: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random top-k (distinct experts per token), softmax weights."""
    scores = torch.rand(n_tokens, n_exp, generator=gen, device="cuda")
    ids = scores.topk(topk, dim=-1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(n_tokens, topk, generator=gen, device="cuda"), -1)
    return weights, ids


def _grouped_mm_moe(x, weights, ids, w13, w2):
    """Dense MoE with torch._grouped_mm: sort pairs by expert, two grouped GEMMs, weighted scatter-add."""
    topk = ids.shape[1]
    flat = ids.flatten().long()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // topk]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    y = y * weights.flatten()[order, None].to(y.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, order // topk, y)
    return out


def _rotating(fn: Callable[[int], object], copies: int) -> Callable[[], object]:
    """Call ``fn(i)`` with i cycling over the weight copies (defeats L2 reuse between timed calls)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return fn(state["i"])

    return call


def _fused_experts_call(fused_experts, x, weights, ids, w13s, w2s, i):
    return fused_experts(x, w13s[i], w2s[i], weights, ids)


def _grouped_mm_call(x, weights, ids, w13s, w2s, i):
    return _grouped_mm_moe(x, weights, ids, w13s[i], w2s[i])


def _ours_call(x, weights, ids, weight_sets, i):
    return ops.moe_forward(x, weights, ids, weight_sets[i])


def _dense_control_call(x, weights, ids, weight_sets, i):
    return ops.moe_dense_control(x, weights, ids, weight_sets[i])


def _vllm_fused_experts():
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except ImportError:
        return None
    return fused_experts


def _versions() -> dict:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("triton", "vllm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        versions["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        versions["driver"] = None
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["mixtral_8x7b", "qwen3_30b_a3b"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 64, 128, 512, 2048, 8192])
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=["2:4", "1:2:128+2:4", "1:2:32+2:4", DENSE_CONTROL],
        help=f"sparse patterns of our kernels; '{DENSE_CONTROL}' runs them on the dense weights (fusion control)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=50, help="timed replays per variant (median reported)")
    parser.add_argument("--no-graph-above", type=int, default=4096, help="time eagerly above this many tokens")
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=["vllm_fused_experts", "torch_grouped_mm"],
        choices=["vllm_fused_experts", "torch_grouped_mm"],
        help="dense baselines to time (none: our kernels only, for tuning runs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_name = torch.cuda.get_device_name()
    copy_bw = _copy_bandwidth_gbs()
    tflops = _matmul_tflops()
    print(f"{device_name}: copy {copy_bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    fused_experts = _vllm_fused_experts() if "vllm_fused_experts" in args.baselines else None
    if fused_experts is None and "vllm_fused_experts" in args.baselines:
        print("vLLM not importable: vllm_fused_experts baseline skipped")
    cases = []
    for shape_name in args.shapes:
        n_exp, topk, hidden, inter = SHAPES[shape_name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        dense_bytes = 3 * n_exp * hidden * inter * 2
        copies = max(1, min(4, math.ceil(L2_ROTATION_BYTES / dense_bytes)))
        dense13 = [
            torch.randn(n_exp, 2 * inter, hidden, generator=gen, device="cuda", dtype=dtype) * 0.02
            for _ in range(copies)
        ]
        dense2 = [
            torch.randn(n_exp, hidden, inter, generator=gen, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)
        ]
        prepared = {}
        for spec in args.patterns:
            if spec == DENSE_CONTROL:  # our kernels on the dense weights (fusion control)
                sets = [ops.prepare_dense_control(w13, w2) for w13, w2 in zip(dense13, dense2, strict=True)]
                prepared[spec] = (sets, 3 * hidden * inter * dtype.itemsize)
                continue
            pattern = parse_pattern(spec)
            prepared[spec] = []
            for w13, w2 in zip(dense13, dense2, strict=True):
                p13 = pack(w13, select_mask(w13.abs(), pattern), pattern)
                p2 = pack(w2, select_mask(w2.abs(), pattern), pattern)
                bytes_per_expert = (p13.nbytes + p2.nbytes) // n_exp
                prepared[spec].append(ops.prepare_moe_weights(p13, p2))
                del p13, p2
            prepared[spec] = (prepared[spec], bytes_per_expert)
        for n_tokens in args.tokens:
            x = torch.randn(n_tokens, hidden, generator=gen, device="cuda", dtype=dtype)
            weights, ids = uniform_routing(n_tokens, n_exp, topk, gen)
            active = int(torch.unique(ids).numel())
            act_bytes = 2 * n_tokens * hidden * 2 + n_tokens * topk * (2 * inter + hidden) * 2
            use_graph = n_tokens <= args.no_graph_above
            baselines = {}
            if fused_experts is not None:
                fn = partial(_fused_experts_call, fused_experts, x, weights, ids, dense13, dense2)
                baselines["vllm_fused_experts"] = _median_us(_rotating(fn, copies), args.repeats, use_graph)
            try:
                if "torch_grouped_mm" in args.baselines:
                    fn = partial(_grouped_mm_call, x, weights, ids, dense13, dense2)
                    baselines["torch_grouped_mm"] = _median_us(_rotating(fn, copies), args.repeats, use_graph)
            except RuntimeError as err:
                print(f"torch._grouped_mm baseline failed ({str(err).splitlines()[0]}); skipped")
            dense_active_bytes = active * 3 * hidden * inter * 2 + act_bytes
            flops = 2 * n_tokens * topk * 3 * hidden * inter
            for spec, (weight_sets, bytes_per_expert) in prepared.items():
                call = _dense_control_call if spec == DENSE_CONTROL else _ours_call
                fn = partial(call, x, weights, ids, weight_sets)
                ours = _median_us(_rotating(fn, copies), args.repeats, use_graph)
                moved = active * bytes_per_expert + act_bytes
                pct_bw = 100 * moved / (ours * 1e-6) / (copy_bw * 1e9)
                line = f"{shape_name:<17} T={n_tokens:<5} {spec:<12} ours {ours:8.1f} us  {pct_bw:5.1f}% copy BW"
                # Without baselines (tuning runs) one case per (shape, tokens, pattern) with baseline None.
                for base_name, base_us in baselines.items() or [(None, None)]:
                    cases.append(
                        {
                            "shape": shape_name,
                            "tokens": n_tokens,
                            "pattern": spec,
                            "dtype": args.dtype,
                            "ours_us": round(ours, 2),
                            "baseline": base_name,
                            "baseline_us": None if base_us is None else round(base_us, 2),
                            "speedup": None if base_us is None else round(base_us / ours, 3),
                            "pct_copy_bw": round(pct_bw, 1),
                            "bytes_moved": moved,
                            "baseline_bytes_moved": dense_active_bytes,
                            "flops": flops,
                            "active_experts": active,
                            "tflops": round(flops / (ours * 1e-6) / 1e12, 1),
                            "graph": use_graph,
                        }
                    )
                    if base_name is not None:
                        line += f" | {base_name} {base_us:8.1f} us x{base_us / ours:5.2f}"
                print(line, flush=True)
        dense13.clear()
        dense2.clear()
        prepared.clear()
        torch.cuda.empty_cache()

    result = {
        "device": device_name,
        "versions": _versions(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "copy_bw_GBs": round(copy_bw, 1),
        "matmul_bf16_TFLOPs": round(tflops, 1),
        "method": "CUDA-graph replay (eager above --no-graph-above tokens), median of CUDA events, "
        f"{args.repeats} repeats, weights rotated over copies totalling >= {L2_ROTATION_BYTES >> 20} MiB, "
        "uniform random top-k routing (seed 0)",
        "cases": cases,
    }
    if args.out is not None:
        write_result(args.out, "moe_kernel", device_name, result)


if __name__ == "__main__":
    main()
