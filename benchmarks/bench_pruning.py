"""CPU cost of mask selection, packing, validation and unpacking for one large expert matrix.

Example::

    python benchmarks/bench_pruning.py --shape 14336 4096 --repeats 5 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_env import cpu_name, git_commit

from samoyeds_vllm.formats import SUPPORTED_CHUNKS, pack, unpack, validate
from samoyeds_vllm.pruning import magnitude_scores, select_mask

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[14336, 4096], metavar=("O", "I"), help="weight [O, I]")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="weight dtype")
    parser.add_argument("--patterns", nargs="+", default=["2:4", *(f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS)])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per stage (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(*args.shape).to(_DTYPES[args.dtype])
    scores = magnitude_scores(weight)
    cases = []
    for spec in args.patterns:
        mask = select_mask(scores, spec)
        packed = pack(weight, mask, spec)
        row = {
            "pattern": spec,
            "select_mask_s": _median_seconds(lambda spec=spec: select_mask(scores, spec), args.repeats),
            "pack_s": _median_seconds(lambda spec=spec, mask=mask: pack(weight, mask, spec), args.repeats),
            "validate_s": _median_seconds(lambda packed=packed: validate(packed), args.repeats),
            "unpack_s": _median_seconds(lambda packed=packed: unpack(packed), args.repeats),
            "bytes": packed.nbytes,
            "bytes_per_weight": packed.nbytes / weight.numel(),
        }
        cases.append(row)
        print(
            f"{spec:<13} select_mask {row['select_mask_s']:.3f} s  pack {row['pack_s']:.3f} s  "
            f"validate {row['validate_s']:.3f} s  unpack {row['unpack_s']:.3f} s  "
            f"{row['bytes_per_weight']:.4f} B/weight"
        )
    result = {
        "device": cpu_name(),
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "cases": cases,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"pruning_cpu_{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
