"""Run one MoE-layer case of the samoyeds kernels repeatedly, for a profiler (ncu) to attach to.

Example (GPU machine)::

    ncu --clock-control none --section SpeedOfLight --section Occupancy -k regex:moe_mma --launch-skip 8 \\
        --launch-count 2 python3 -P benchmarks/profile_moe_case.py --shape mixtral_8x7b --tokens 128 --pattern 2:4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_moe_kernel (also under python -P)

from bench_moe_kernel import SHAPES, uniform_routing

from samoyeds_vllm import ops
from samoyeds_vllm.formats import pack, parse_pattern
from samoyeds_vllm.pruning import select_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral_8x7b")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    n_exp, topk, hidden, inter = SHAPES[args.shape]
    pattern = parse_pattern(args.pattern)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(n_exp, 2 * inter, hidden, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(n_exp, hidden, inter, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    prepared = ops.prepare_moe_weights(
        pack(w13, select_mask(w13.abs(), pattern), pattern), pack(w2, select_mask(w2.abs(), pattern), pattern)
    )
    del w13, w2
    x = torch.randn(args.tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    weights, ids = uniform_routing(args.tokens, n_exp, topk, gen)  # the benchmark's routing
    for _ in range(args.iters):
        ops.moe_forward(x, weights, ids, prepared)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
