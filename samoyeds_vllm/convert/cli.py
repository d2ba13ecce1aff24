"""``samoyeds-convert``: dense Hugging Face MoE checkpoint -> samoyeds sparse checkpoint.

Usage::

    samoyeds-convert SRC_DIR OUT_DIR --pattern 1:2:128+2:4 [--method magnitude|wanda|sparsegpt]
                     [--calibration FILE.txt|.jsonl] [--targets experts,shared_experts] [--ignore REGEX]
                     [--dtype bf16] [--dry-run] [--overwrite] [--router-weighted]
    samoyeds-convert --synthetic CONFIG.json OUT_DIR --pattern 1:2:128+2:4 [--dtype bf16]

The parser is built from the fields of ``pipeline.ConvertOptions`` (help text included), so flags and library
options cannot drift apart. The lifecycle is ``pipeline.run``: Resolve, Plan, Validate, Convert.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from .pipeline import DTYPES, ConvertOptions, ConvertPlan, ConvertSummary, run

__all__ = ["build_parser", "main"]

_POSITIONAL = ("source", "output")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _is_optional(annotation: object) -> bool:
    return isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)


def build_parser() -> argparse.ArgumentParser:
    """The ``samoyeds-convert`` argument parser (one flag per ``ConvertOptions`` field, plus synthetic mode)."""
    parser = argparse.ArgumentParser(
        prog="samoyeds-convert",
        description="Prune the experts of a dense Hugging Face MoE checkpoint to a samoyeds sparsity pattern and "
        "pack them (Resolve, Plan, Validate, Convert; streaming, written atomically). With --synthetic, write a "
        "random-weight sparse checkpoint of a config instead.",
        usage="samoyeds-convert SRC_DIR OUT_DIR [--pattern P] [options]\n"
        "       samoyeds-convert --synthetic CONFIG.json OUT_DIR [--pattern P] [options]",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="SRC_DIR OUT_DIR, or only OUT_DIR with --synthetic")
    hints = typing.get_type_hints(ConvertOptions)
    for spec in dataclasses.fields(ConvertOptions):
        if spec.name in _POSITIONAL:
            continue
        meta = dict(spec.metadata)
        text = meta["help"]
        if spec.default not in (None, False, ()) and "default" not in text:
            shown = ",".join(spec.default) if isinstance(spec.default, tuple) else spec.default
            text += f" (default: {shown})"
        kwargs: dict[str, object] = {"help": text, "dest": spec.name}
        hint = hints[spec.name]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif spec.name == "targets":
            kwargs.update(type=_comma_list, default=spec.default)
        elif spec.name == "ignore":
            kwargs.update(action="append", default=None)
        else:
            base = next(a for a in typing.get_args(hint) if a is not type(None)) if _is_optional(hint) else hint
            kwargs.update(type=base, default=spec.default)
            if "choices" in meta:
                kwargs["choices"] = list(meta["choices"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(_flag(spec.name), **kwargs)
    parser.add_argument(
        "--synthetic",
        type=Path,
        metavar="CONFIG.json",
        help="write a random-weight sparse checkpoint of this Hugging Face config directly (no dense weights, no "
        "SRC_DIR); --dtype defaults to bf16",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of --synthetic weights (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def _gb(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _print_plan(conversion: ConvertPlan) -> None:
    source, options = conversion.source, conversion.options
    print(f"source       {source.root} ({source.layout.model_type}, {len(source.shards)} shard(s))")
    print(f"pattern      {conversion.pattern} (density {conversion.pattern.density:.0%}), method {options.method}")
    print(f"targets      {','.join(options.targets)}; ignored modules: {len(conversion.ignored_modules)}")
    layers: dict[int | None, int] = {}
    for t in conversion.tensors:
        if t.weights:
            layers[t.layer] = layers.get(t.layer, 0) + t.weights
    if layers:
        lo, hi = min(k for k in layers if k is not None), max(k for k in layers if k is not None)
        print(f"would prune  {sum(layers.values())} weights in layers {lo}..{hi} ({len(layers)} layers)")
    _print_table(conversion.totals())


def _print_table(totals: dict[str, dict[str, int]]) -> None:
    print(f"{'tensor kind':34} {'tensors':>8} {'weights':>8} {'bytes before':>14} {'bytes after':>14} {'ratio':>6}")
    for kind, row in totals.items():
        ratio = row["bytes_in"] / row["bytes_out"] if row["bytes_out"] else 0.0
        print(
            f"{kind:34} {row['tensors']:>8} {row['weights']:>8} {_gb(row['bytes_in']):>14} "
            f"{_gb(row['bytes_out']):>14} {ratio:>5.2f}x"
        )
    bytes_in = sum(r["bytes_in"] for r in totals.values())
    bytes_out = sum(r["bytes_out"] for r in totals.values())
    print(f"{'total':34} {'':>8} {'':>8} {_gb(bytes_in):>14} {_gb(bytes_out):>14} {bytes_in / bytes_out:>5.2f}x")


def _print_summary(summary: ConvertSummary) -> None:
    print(f"wrote {summary.output}")
    print(f"layers {summary.layers}, experts {summary.experts}, weights pruned {summary.weights_pruned}, ", end="")
    print(f"density {summary.density:.4f}", end="")
    if summary.fallback_weights:
        print(f", {summary.fallback_weights} weights fell back to magnitude (no calibration tokens)", end="")
    print()
    if not summary.bytes_in:  # synthetic: nothing was read
        rate = summary.bytes_out / summary.seconds / 1e9 if summary.seconds else 0.0
        print(f"wrote {_gb(summary.bytes_out)} in {summary.seconds:.1f} s ({rate:.3f} GB/s)")
        return
    _print_table(summary.per_kind)
    saved = summary.bytes_in - summary.bytes_out
    print(f"saved {_gb(saved)} in {summary.seconds:.1f} s ({summary.gbps:.3f} GB/s of source)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samoyeds-convert`` and ``python -m samoyeds_vllm.convert``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.synthetic is not None:
            if len(args.paths) != 1:
                parser.error("with --synthetic give exactly one directory: OUT_DIR")
            from .synthetic import write_synthetic_checkpoint

            summary = write_synthetic_checkpoint(
                args.synthetic,
                Path(args.paths[0]),
                args.pattern,
                dtype=DTYPES[args.dtype or "bf16"],
                seed=args.seed,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )
            if not args.quiet:
                _print_summary(summary)
            return 0
        if len(args.paths) != 2:
            parser.error("give SRC_DIR and OUT_DIR")
        names = [f.name for f in dataclasses.fields(ConvertOptions) if f.name not in _POSITIONAL]
        values = {name: getattr(args, name) for name in names}
        values["ignore"] = tuple(values["ignore"] or ())
        options = ConvertOptions(source=Path(args.paths[0]), output=Path(args.paths[1]), **values)
        conversion, summary = run(options, progress=not args.quiet)
    except (ValueError, TypeError, OSError) as err:
        print(f"samoyeds-convert: error: {err}", file=sys.stderr)
        return 2
    if summary is None:
        _print_plan(conversion)
        print("dry run: nothing written")
    elif not args.quiet:
        _print_summary(summary)
    return 0
