"""``make demo``: prune, pack and run a tiny random MoE layer in every pattern; print what it costs.

For each pattern the demo selects a magnitude mask, packs the experts, runs the ``samoyeds::moe_sparse`` op
(the exact reference on CPU, the kernel on a GPU when built) and compares it with a float64 dense MoE on the
masked weights.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .formats import SUPPORTED_CHUNKS, pack, parse_pattern, unpack
from .ops import moe_sparse
from .pruning import magnitude_scores, select_mask

__all__ = ["main", "run_demo"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dense_masked_moe(x, topk_weights, topk_ids, w13, w2) -> torch.Tensor:
    """float64 MoE on dense masked weights, one expert at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    inter = w2.shape[-1]
    for e in range(w13.shape[0]):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = x[token].double() @ w13[e].double().t()
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].double().t()
        out.index_add_(0, token, y * topk_weights[token, slot, None].double())
    return out


def run_demo(
    experts: int = 8,
    topk: int = 2,
    hidden: int = 256,
    intermediate: int = 512,
    tokens: int = 16,
    dtype: str = "bf16",
    device: str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """Build, prune, pack and run the layer for every pattern; return one row per pattern."""
    gen = torch.Generator().manual_seed(seed)
    dt = _DTYPES[dtype]
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5).to(dt)
    w2 = (torch.randn(experts, hidden, intermediate, generator=gen) / intermediate**0.5).to(dt)
    x = torch.randn(tokens, hidden, generator=gen).to(dt)
    logits = torch.randn(tokens, experts, generator=gen)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(topk, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    dense_bytes = (w13.numel() + w2.numel()) * w13.element_size()
    dense_out = _dense_masked_moe(x, topk_weights, topk_ids, w13, w2)
    rows = [{"pattern": "dense", "bytes": dense_bytes, "ratio": 1.0, "density": 1.0, "kept_energy": 1.0}]
    for spec in ["2:4", *(f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS)]:
        pattern = parse_pattern(spec)
        if hidden % pattern.col_multiple or intermediate % pattern.col_multiple:
            continue
        start = time.perf_counter()
        p13 = pack(w13, select_mask(magnitude_scores(w13), pattern), pattern)
        p2 = pack(w2, select_mask(magnitude_scores(w2), pattern), pattern)
        prune_s = time.perf_counter() - start
        d13, d2 = unpack(p13), unpack(p2)
        start = time.perf_counter()
        out = moe_sparse(
            x.to(device), topk_weights.to(device), topk_ids.to(torch.int32).to(device), p13.to(device), p2.to(device)
        ).cpu()
        op_s = time.perf_counter() - start
        reference = _dense_masked_moe(x, topk_weights, topk_ids.to(torch.int32), d13, d2)
        err = (out.double() - reference).abs()
        kept = (d13.double().square().sum() + d2.double().square().sum()) / (
            w13.double().square().sum() + w2.double().square().sum()
        )
        rows.append(
            {
                "pattern": spec,
                "bytes": p13.nbytes + p2.nbytes,
                "ratio": dense_bytes / (p13.nbytes + p2.nbytes),
                "density": float(((d13 != 0).sum() + (d2 != 0).sum()) / (w13.numel() + w2.numel())),
                "kept_energy": float(kept),
                "max_abs_err": float(err.max()),
                "rel_err": float(err.norm() / reference.norm()),
                "sqnr_vs_dense_db": float(
                    10 * torch.log10(dense_out.square().sum() / (out.double() - dense_out).square().sum())
                ),
                "prune_pack_ms": prune_s * 1e3,
                "op_ms": op_s * 1e3,
            }
        )
    return rows


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"samoyeds-vllm demo: E={args.experts} k={args.topk} H={args.hidden} I={args.intermediate} "
        f"T={args.tokens} {args.dtype} on {args.device}"
    )
    header = (
        f"{'pattern':<14}{'bytes':>11}{'B/weight':>10}{'smaller':>9}{'density':>9}{'|W|² kept':>11}"
        f"{'max|err|':>11}{'rel err':>10}{'SQNR/dense':>12}{'prune+pack':>12}{'op':>10}"
    )
    print(header)
    print("-" * len(header))
    n_weights = 3 * args.experts * args.hidden * args.intermediate
    for r in rows:
        line = (
            f"{r['pattern']:<14}{r['bytes']:>11,}{r['bytes'] / n_weights:>10.4f}{r['ratio']:>8.2f}x"
            f"{r['density']:>9.3f}{r['kept_energy']:>11.3f}"
        )
        if "max_abs_err" in r:
            line += (
                f"{r['max_abs_err']:>11.2e}{r['rel_err']:>10.2e}{r['sqnr_vs_dense_db']:>9.1f} dB"
                f"{r['prune_pack_ms']:>9.1f} ms{r['op_ms']:>7.1f} ms"
            )
        print(line)
    print(
        "max|err| / rel err: samoyeds::moe_sparse vs a float64 dense MoE on the same masked weights "
        f"(only {args.dtype} output rounding).\nSQNR/dense: how far pruning moves the layer output from the unpruned "
        "layer (random weights: an upper bound on damage; real checkpoints use calibrated pruners)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="number of routed experts E")
    parser.add_argument("--topk", type=int, default=2, help="experts per token k")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H")
    parser.add_argument("--intermediate", type=int, default=512, help="expert intermediate size I")
    parser.add_argument("--tokens", type=int, default=16, help="tokens T")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weight/activation dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for the op")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    rows = run_demo(
        args.experts, args.topk, args.hidden, args.intermediate, args.tokens, args.dtype, args.device, args.seed
    )
    _print_table(rows, args)


if __name__ == "__main__":
    main()
