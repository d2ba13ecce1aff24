"""Plot bench_serve.py JSON results (decode tok/s and TPOT vs batch per variant) and print their markdown tables.

Example::

    python benchmarks/plot_serve.py benchmarks/results/serve_qwen3_30b_a3b_NVIDIA_H200_2026-11-23.json \\
        benchmarks/results/serve_mixtral_8x7b_NVIDIA_H200_2026-11-23.json

One PNG per JSON (next to it, or ``--out`` for a single JSON); the tables cover all files given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINE = "dense_stock"


def _order(name: str) -> tuple[int, str]:
    return (0 if name == BASELINE else 1 if name == "2:4" else 2, name)


def _variants(result: dict) -> list[str]:
    return sorted({r["variant"] for r in result["runs"]}, key=_order)


def markdown_table(results: list[dict]) -> str:
    """Throughput table (decode tok/s, TPOT, speedup over dense stock per batch) and a memory table."""
    names = sorted({v for r in results for v in _variants(r)}, key=_order)
    head = "| model | TP | batch | " + " | ".join(f"{n} tok/s (TPOT ms, x)" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for result in results:
        runs = result["runs"]
        for tp, batch in sorted({(r["tp"], r["batch"]) for r in runs}):
            cell = {r["variant"]: r for r in runs if r["tp"] == tp and r["batch"] == batch}
            base = cell.get(BASELINE)
            cells = []
            for name in names:
                run = cell.get(name)
                if run is None or run["decode_tok_s"] is None:  # absent, or decode time not measurable
                    cells.append("-")
                    continue
                measured = base and base["decode_tok_s"] and name != BASELINE
                ratio = f", {run['decode_tok_s'] / base['decode_tok_s']:.2f}x" if measured else ""
                cells.append(f"{run['decode_tok_s']:.0f} ({run['tpot_ms']:.2f}{ratio})")
            lines.append(f"| {result['model']} | {tp} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "| model | TP | variant | weights GiB (vLLM) | KV-cache tokens | engine start s |"]
    lines.append("|---|---|---|---|---|---|")
    for result in results:
        seen = set()
        for run in sorted(result["runs"], key=lambda r: (r["tp"], _order(r["variant"]))):
            key = (run["tp"], run["variant"])
            if key in seen:
                continue
            seen.add(key)
            start = next(
                (v.get("engine_init_s") for v in result.get("variants", []) if v["variant"] == run["variant"]), None
            )
            kv = f"{run['kv_cache_tokens']:,}" if run.get("kv_cache_tokens") else "-"
            weights = "-" if run.get("weight_gib") is None else f"{run['weight_gib']:.2f}"
            lines.append(
                f"| {result['model']} | {run['tp']} | {run['variant']} | {weights} | {kv} | "
                f"{start if start is not None else '-'} |"
            )
    return "\n".join(lines)


def plot(result: dict, out: Path) -> Path:
    """Two panels: decode tok/s and TPOT vs batch, one line per variant (legend: weights and KV tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in _variants(result):
        rows = sorted((r for r in result["runs"] if r["variant"] == name), key=lambda r: (r["tp"], r["batch"]))
        for tp in sorted({r["tp"] for r in rows}):
            series = [r for r in rows if r["tp"] == tp]
            first = series[0]
            facts = [f"TP={tp}"]
            if first.get("weight_gib") is not None:
                facts.append(f"{first['weight_gib']} GiB weights")
            if first.get("kv_cache_tokens"):
                facts.append(f"{first['kv_cache_tokens']:,} KV tokens")
            label = f"{name} ({', '.join(facts)})"
            batches = [r["batch"] for r in series]
            nan = float("nan")  # runs whose decode time was not measurable leave a gap
            tput.plot(batches, [r["decode_tok_s"] or nan for r in series], marker="o", label=label)
            tpot.plot(batches, [r["tpot_ms"] or nan for r in series], marker="o", label=label)
    for ax, ylabel in ((tput, "decode tokens/s"), (tpot, "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    tput.set_yscale("log", base=2)
    tput.legend(fontsize=7)
    settings = result.get("settings", {})
    fig.suptitle(
        f"vLLM offline decode, {result['model']}, {result['device']}, {result['date']} (commit {result['commit']}); "
        f"prompt {settings.get('prompt_len')} + output {settings.get('output_len')} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="result files written by bench_serve.py")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (one JSON only; default: next to it)")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    if args.out is not None and len(args.json) != 1:
        parser.error("--out needs exactly one JSON")
    results = [json.loads(path.read_text()) for path in args.json]
    print(markdown_table(results))
    if not args.no_plot:
        for path, result in zip(args.json, results, strict=True):
            if result["runs"]:
                plot(result, args.out or path.with_suffix(".png"))


if __name__ == "__main__":
    main()
