"""Plot a bench_moe_kernel.py JSON (speedup vs tokens, one panel per shape) and print its markdown table.

Example::

    python benchmarks/plot_moe_kernel.py benchmarks/results/moe_kernel_NVIDIA_H200_2026-11-21.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def markdown_table(result: dict, baseline: str) -> str:
    """One row per (shape, tokens): baseline us, then per pattern: ours us, speedup, % of copy bandwidth."""
    cases = [c for c in result["cases"] if c["baseline"] == baseline]
    patterns = sorted({c["pattern"] for c in cases}, key=lambda p: (p != "2:4", p))
    head = f"| shape | tokens | {baseline} µs | " + " | ".join(f"{p} µs (x, %BW)" for p in patterns) + " |"
    lines = [head, "|" + "---|" * (3 + len(patterns))]
    for shape, tokens in sorted({(c["shape"], c["tokens"]) for c in cases}):
        row = {c["pattern"]: c for c in cases if c["shape"] == shape and c["tokens"] == tokens}
        base = next(iter(row.values()))["baseline_us"]
        cells = [
            f"{row[p]['ours_us']:.0f} ({row[p]['speedup']:.2f}x, {row[p]['pct_copy_bw']:.0f}%)" if p in row else "-"
            for p in patterns
        ]
        lines.append(f"| {shape} | {tokens} | {base:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="result file written by bench_moe_kernel.py")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the JSON)")
    parser.add_argument("--baseline", default="vllm_fused_experts", help="baseline shown in the markdown table")
    args = parser.parse_args()
    result = json.loads(args.json.read_text())
    print(markdown_table(result, args.baseline))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    shapes = sorted({c["shape"] for c in cases})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = [c for c in cases if c["shape"] == shape]
        for baseline in sorted({c["baseline"] for c in rows if c["baseline"] is not None}):
            for pattern in sorted({c["pattern"] for c in rows}):
                series = sorted(
                    (c["tokens"], c["speedup"]) for c in rows if c["pattern"] == pattern and c["baseline"] == baseline
                )
                if series:
                    style = "-" if baseline == "vllm_fused_experts" else ":"
                    ax.plot(*zip(*series, strict=True), style, marker="o", label=f"{pattern} vs {baseline}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup (baseline time / ours)")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"samoyeds MoE layer, {result['device']}, {result['date']} (commit {result['commit']})")
    fig.tight_layout()
    out = args.out or args.json.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
