"""samoyeds-convert on this CPU: magnitude GB/s and peak RSS on a multi-GB dense checkpoint; Wanda/SparseGPT per layer.

1. Writes a random dense MoE checkpoint (OLMoE-like shapes by default: E=64, H=2048, I=1024, per-expert bf16 keys)
   of about ``--target-gb`` GB in shards of ``--shard-gb``.
2. Converts it with magnitude pruning in a child process (``python -m samoyeds_vllm.convert``) and reads the child's
   peak RSS (``VmHWM``); an import-only child gives the interpreter + torch baseline.
3. Converts a small model of the same expert shapes (``--calib-experts`` experts, 2 layers) with Wanda and SparseGPT
   on calibration text, and reports seconds per layer (and per expert weight, to extrapolate to more experts).

Writes JSON to ``benchmarks/results/convert_cpu_<date>.json`` and removes the temporary checkpoints.

Example::

    python benchmarks/bench_convert.py --target-gb 2 --shard-gb 1 --pattern 1:2:128+2:4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_env import cpu_name, git_commit

from samoyeds_vllm.convert import ConvertOptions, run
from samoyeds_vllm.convert.synthetic import write_synthetic_dense_checkpoint

_CALIBRATION_TEXT = (
    "the quick brown fox jumps over the lazy dog a sparse mixture of experts routes every token to a few experts "
    "each expert is a small feed forward network hello world how are you today one two three four five six seven"
)


def _olmoe_config(layers: int, experts: int, hidden: int, inter: int, vocab: int) -> dict[str, object]:
    return {
        "model_type": "olmoe",
        "architectures": ["OlmoeForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "num_experts": experts,
        "num_experts_per_tok": 8 if experts >= 8 else 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 3,
    }


_PEAK_RSS = (
    # VmHWM is the high-water mark of this process's own address space. ru_maxrss is not used: Linux carries it
    # over from the forking parent across exec, so a child of a large parent would report the parent's size.
    "def _peak_rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) * 1024\n"
)


def _child_peak_rss(args: list[str]) -> tuple[float, int]:
    """Run ``samoyeds-convert args`` in a child; returns (wall seconds, the child's peak RSS in bytes)."""
    code = (
        "import runpy, sys\n" + _PEAK_RSS + f"sys.argv = {['samoyeds-convert', *args]!r}\n"
        "try:\n    runpy.run_module('samoyeds_vllm.convert', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('PEAK_RSS', _peak_rss())\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS"))
    return wall, peak


def _baseline_rss() -> int:
    """Peak RSS of a child that only imports the converter (interpreter + torch + safetensors + tqdm)."""
    code = "import samoyeds_vllm.convert.cli\n" + _PEAK_RSS + "print(_peak_rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-gb", type=float, default=2.0, help="approximate size of the dense checkpoint (GB)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="dense checkpoint shard size (GB)")
    parser.add_argument("--experts", type=int, default=64, help="experts per layer of the large checkpoint")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size H")
    parser.add_argument("--intermediate", type=int, default=1024, help="expert intermediate size I")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--pattern", default="1:2:128+2:4", help="sparsity pattern")
    parser.add_argument("--calib-experts", type=int, default=4, help="experts per layer of the Wanda/SparseGPT model")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--skip-large", action="store_true", help="skip the multi-GB magnitude run")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary checkpoints go (default: /tmp)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    record: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pattern": args.pattern,
        "loadavg_start": os.getloadavg(),
        "note": "2-core CPU shared with other jobs: see loadavg; timings scale with contention",
    }
    try:
        if not args.skip_large:
            e, h, i = args.experts, args.hidden, args.intermediate
            per_layer = 3 * e * h * i * 2 + 4 * h * h * 2
            layers = max(1, round((args.target_gb * 1e9 - 2 * args.vocab * h * 2) / per_layer))
            config = work / "large.json"
            config.write_text(json.dumps(_olmoe_config(layers, e, h, i, args.vocab)))
            start = time.perf_counter()
            dense_bytes = write_synthetic_dense_checkpoint(
                config, work / "dense", max_shard_bytes=int(args.shard_gb * 1e9)
            )
            gen_s = time.perf_counter() - start
            shards = sorted((work / "dense").glob("*.safetensors"))
            largest = max(p.stat().st_size for p in shards)
            print(f"dense checkpoint: {dense_bytes / 1e9:.2f} GB in {len(shards)} shards ({gen_s:.1f} s)")
            wall, peak = _child_peak_rss([str(work / "dense"), str(work / "sparse"), "--pattern", args.pattern])
            out_bytes = sum(p.stat().st_size for p in (work / "sparse").glob("*.safetensors"))
            baseline = _baseline_rss()
            record["magnitude"] = {
                "model": {"layers": layers, "experts": e, "hidden": h, "intermediate": i, "vocab": args.vocab},
                "dense_bytes": dense_bytes,
                "dense_shards": len(shards),
                "largest_shard_bytes": largest,
                "sparse_bytes": out_bytes,
                "wall_s": wall,
                "gb_per_s": dense_bytes / wall / 1e9,
                "peak_rss_bytes": peak,
                "peak_rss_over_largest_shard": peak / largest,
                "import_baseline_rss_bytes": baseline,
                "acceptance_peak_rss_below_3x_largest_shard": peak < 3 * largest,
            }
            print(json.dumps(record["magnitude"], indent=2))
            shutil.rmtree(work / "dense")
            shutil.rmtree(work / "sparse")

        config = work / "calib.json"
        e, h, i = args.calib_experts, args.hidden, args.intermediate
        config.write_text(json.dumps(_olmoe_config(2, e, h, i, 512)))
        write_synthetic_dense_checkpoint(config, work / "calib-dense", max_shard_bytes=2 * 10**9)
        text = work / "calib.txt"
        gen = torch.Generator().manual_seed(0)
        vocab = _CALIBRATION_TEXT.split()
        words = [vocab[j] for j in torch.randint(len(vocab), (40000,), generator=gen)]
        text.write_text(" ".join(words))
        per_method: dict[str, object] = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            options = ConvertOptions(
                source=work / "calib-dense",
                output=work / f"calib-{method}",
                pattern=args.pattern,
                method=method,
                calibration=text if method != "magnitude" else None,
                num_calibration_samples=args.calib_samples,
                calibration_seq_len=args.calib_seq_len,
            )
            start = time.perf_counter()
            run(options, progress=False)
            seconds = time.perf_counter() - start
            per_method[method] = {"total_s": seconds}
            print(f"{method}: {seconds:.1f} s for 2 layers x {e} experts")
        base = per_method["magnitude"]["total_s"]
        for method in ("wanda", "sparsegpt"):
            extra = per_method[method]["total_s"] - base
            per_method[method]["s_per_layer"] = extra / 2
            per_method[method]["s_per_expert_weight"] = extra / (2 * e * 3)
        record["calibrated"] = {
            "model": {"layers": 2, "experts": e, "hidden": h, "intermediate": i},
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "note": "s_per_layer = (method total - magnitude total) / layers; includes the calibration forwards",
            **per_method,
        }
        print(json.dumps(record["calibrated"], indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"convert_cpu_{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
