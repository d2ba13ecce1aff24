"""samoyeds-convert end to end: every architecture in both key layouts, Transformers loading, errors, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import build_tiny_model, write_tiny_checkpoint, write_tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.convert import SUPPORTED_MODEL_TYPES, writer
from samoyeds_vllm.convert.cli import main
from samoyeds_vllm.formats import PackedWeight, validate

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
SEED = 1
CALIBRATION = " ".join(
    "the quick brown fox jumps over the lazy dog . a sparse mixture of experts routes every token to a few experts ;"
    f" hello world {i} , how are you today ? one two three four five six seven eight nine ten ." * 2
    for i in range(12)
)


def _save_dense(arch: str, out: Path, fused: bool, **save_kwargs) -> Path:
    """The tiny dense model of ``arch`` on disk: per-expert keys (``save_pretrained``) or fused 3-D expert keys."""
    model = build_tiny_model(arch, seed=SEED)
    if fused:
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        model.config.to_json_file(str(out / "config.json"))
    else:
        model.save_pretrained(str(out), **save_kwargs)
    write_tiny_tokenizer(out)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_both_layouts_match_the_dense_masked_model(root: Path, arch: str) -> None:
    pattern = "1:2:32+2:4" if arch in ("mixtral", "qwen3_moe", "deepseek_v2") else "2:4"
    reference = write_tiny_checkpoint(arch, root / f"{arch}-ref", pattern, SEED, dense_masked_dir=root / f"{arch}-dm")
    expected = _tensors(reference)
    for fused in (False, True):
        dense = _save_dense(arch, root / f"{arch}-dense-{fused}", fused)
        out = root / f"{arch}-sparse-{fused}"
        assert main([str(dense), str(out), "--pattern", pattern, "--quiet"]) == 0
        got = _tensors(out)
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
        config = json.loads((out / "config.json").read_text())
        quant = config["quantization_config"]
        assert config["architectures"] and quant["pattern"] == pattern and quant["format_version"] == 1
        assert quant["pruning"]["method"] == "magnitude" and quant["pruning"]["tool"].startswith("samoyeds-convert")
        assert (out / "tokenizer.json").is_file()
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(out, ids), _logits(root / f"{arch}-dm", ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "arch"), [("wanda", "qwen3_moe"), ("sparsegpt", "mixtral"), ("sparsegpt", "deepseek_v2")]
)
def test_calibrated_methods_write_valid_loadable_checkpoints(root: Path, method: str, arch: str) -> None:
    dense = root / f"{arch}-dense-calib"
    if not dense.exists():
        _save_dense(arch, dense, fused=False)
    text = root / "calib.jsonl"
    text.write_text("".join(json.dumps({"text": CALIBRATION[i::3]}) + "\n" for i in range(3)))
    out = root / f"{arch}-{method}"
    args = [str(dense), str(out), "--pattern", "1:2:32+2:4", "--method", method, "--calibration", str(text)]
    assert main([*args, "--num-calibration-samples", "4", "--calibration-seq-len", "64", "--router-weighted"]) == 0
    prov = json.loads((out / "config.json").read_text())["quantization_config"]["pruning"]
    assert prov["method"] == method and prov["router_weighted"] is True
    assert prov["calibration"]["samples"] == 4 and prov["calibration"]["seq_len"] == 64
    tensors = _tensors(out)
    stems = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".sp_values")})
    assert len(stems) == 2 * 8 * 3
    for stem in stems:
        parts = {s: tensors[f"{stem}.{s}"] for s in ("sp_values", "sp_meta", "sp_rowsel")}
        validate(PackedWeight.from_tensors("1:2:32+2:4", parts, stem), stem)
    ids = torch.randint(4, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_logits(out, ids)).all()


def test_experts_without_calibration_tokens_fall_back_to_magnitude(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dense = root / "olmoe-dense-few"
    _save_dense("olmoe", dense, fused=True)
    text = root / "short.txt"
    text.write_text("hello world")  # 2-3 tokens x top-2 of 8 experts: most experts see nothing
    out = root / "olmoe-few"
    args = [str(dense), str(out), "--pattern", "2:4", "--method", "wanda", "--calibration", str(text), "--quiet"]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "received no calibration tokens" in caplog.text
    prov = json.loads((out / "config.json").read_text())["quantization_config"]["pruning"]
    assert prov["fallback_to_magnitude"] > 0


def test_sharded_input_and_output_ignore_and_dtype(root: Path) -> None:
    dense = _save_dense("mixtral", root / "mixtral-sharded", fused=False, max_shard_size="400KB")
    assert (dense / "model.safetensors.index.json").is_file()
    out = root / "mixtral-sharded-out"
    args = [str(dense), str(out), "--pattern", "2:4", "--ignore", r"layers\.1\.", "--dtype", "bf16"]
    assert main([*args, "--max-shard-size", "300KB", "--quiet"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not list(out.glob(".*"))  # no temporary shard names left
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"]["ignore"] == ["model.layers.1.block_sparse_moe.experts"]
    tensors = _tensors(out)
    assert tensors["model.layers.0.block_sparse_moe.experts.0.w1.sp_values"].dtype == torch.bfloat16
    assert tensors["model.layers.1.block_sparse_moe.experts.0.w1.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("model.layers.1.") and k.endswith("sp_values") for k in tensors)
    ids = torch.randint(4, 500, (1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_logits(out, ids, torch.bfloat16)).all()


def test_shared_experts_target_packs_them(root: Path) -> None:
    dense = _save_dense("qwen2_moe", root / "qwen2-shared", fused=False)
    out = root / "qwen2-shared-out"
    assert main([str(dense), str(out), "--pattern", "2:4", "--targets", "experts,shared_experts", "--quiet"]) == 0
    tensors = _tensors(out)
    assert "model.layers.0.mlp.shared_expert.gate_proj.sp_values" in tensors
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" not in tensors
    assert "model.layers.0.mlp.shared_expert_gate.weight" in tensors
    targets = json.loads((out / "config.json").read_text())["quantization_config"]["targets"]
    assert targets == ["experts", "shared_experts"]


def test_dry_run_prints_the_plan_and_writes_nothing(root: Path, capsys: pytest.CaptureFixture) -> None:
    dense = _save_dense("deepseek_v2", root / "ds2-dry", fused=False)
    out = root / "ds2-dry-out"
    assert main([str(dense), str(out), "--pattern", "1:2:64+2:4", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "routed experts (pruned)" in printed and "other (copied)" in printed
    assert "would prune  48 weights in layers 0..1" in printed and "dry run: nothing written" in printed
    assert not out.exists() and not list(root.glob(".ds2-dry-out*"))


def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int, error: BaseException) -> None:
    real = writer.write_safetensors
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_safetensors", flaky)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_out_dir(
    root: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    dense = root / "olmoe-interrupt"
    if not dense.exists():
        _save_dense("olmoe", dense, fused=False)
    out = root / f"olmoe-interrupt-{type(error).__name__}"
    _fail_after(monkeypatch, 2, error)
    args = [str(dense), str(out), "--pattern", "2:4", "--max-shard-size", "200KB", "--quiet"]
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            main(args)
    else:
        assert main(args) == 2
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}")]


def test_temp_dir_of_a_killed_run_is_removed(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    dense = root / "olmoe-interrupt"
    if not dense.exists():
        _save_dense("olmoe", dense, fused=False)
    out = root / "olmoe-killed"
    stale = root / f".{out.name}.samoyeds-tmp-{2**22 + 1}"  # above Linux's largest pid: that process is gone
    stale.mkdir()
    (stale / ".shard-00001.safetensors.part").write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        assert main([str(dense), str(out), "--pattern", "2:4", "--quiet"]) == 0
    assert not stale.exists() and "left by an interrupted conversion" in caplog.text
    assert (out / "model.safetensors").is_file()


def test_failed_overwrite_keeps_the_old_out_dir(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _save_dense("qwen3_moe", root / "qwen3-overwrite", fused=False)
    out = root / "qwen3-overwrite-out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _fail_after(monkeypatch, 0, OSError("disk full"))
    assert main([str(dense), str(out), "--pattern", "2:4", "--overwrite", "--quiet"]) == 2
    assert (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    assert main([str(dense), str(out), "--pattern", "2:4", "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors_and_write_nothing(root: Path, capsys: pytest.CaptureFixture) -> None:
    dense = root / "qwen3_moe-dense-calib"
    if not dense.exists():
        _save_dense("qwen3_moe", dense, fused=False)
    out = root / "never"

    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    err = _error([str(llama), str(out)], capsys)
    assert "'llama' is not supported" in err and all(a in err for a in SUPPORTED_MODEL_TYPES)

    err = _error([str(dense), str(out), "--pattern", "1:2:256+2:4"], capsys)
    assert "model.layers.0.mlp.experts.0." in err and ".weight: pattern 1:2:256+2:4" in err and "V=256" in err

    assert "needs --calibration" in _error([str(dense), str(out), "--method", "wanda"], capsys)
    assert "matches no MoE module" in _error([str(dense), str(out), "--ignore", "layers\\.9\\."], capsys)
    assert "unknown sparsity pattern" in _error([str(dense), str(out), "--pattern", "3:4"], capsys)
    assert "no config.json" in _error([str(root / "missing"), str(out)], capsys)
    assert not out.exists()

    existing = root / "exists"
    existing.mkdir()
    assert "already exists; pass --overwrite" in _error([str(dense), str(existing), "--pattern", "2:4"], capsys)


def test_module_entry_point_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samoyeds_vllm.convert", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--pattern", "--method", "--calibration", "--targets", "--ignore", "--dtype", "--dry-run"):
        assert flag in result.stdout
    assert "--synthetic" in result.stdout and "--router-weighted" in result.stdout


@pytest.mark.slow
def test_vllm_generates_like_transformers_from_a_sparsegpt_conversion(root: Path) -> None:
    pytest.importorskip("vllm")
    from vllm_plugin.vllm_test_utils import PROMPTS, failure_report, run_engine

    dense = root / "qwen3_moe-dense-calib"
    if not dense.exists():
        _save_dense("qwen3_moe", dense, fused=False)
    text = root / "calib-vllm.txt"
    text.write_text(CALIBRATION)
    out = root / "qwen3-sparsegpt-vllm"
    args = [str(dense), str(out), "--pattern", "1:2:32+2:4", "--method", "sparsegpt", "--calibration", str(text)]
    assert main([*args, "--calibration-seq-len", "64", "--quiet"]) == 0
    result = run_engine(out, PROMPTS, 6, "--enforce-eager")
    assert result.returncode == 0, failure_report(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for ids, tokens in zip(PROMPTS, result.tokens, strict=True):
        generated = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert generated[0, len(ids) :].tolist() == tokens
