"""Transformers loads samoyeds checkpoints: same logits as the dense model with the same masks, clean loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import write_tiny_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.convert import SUPPORTED_MODEL_TYPES, build_quantization_config
from samoyeds_vllm.hf import SamoyedsConfig, SamoyedsExperts, register

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
PATTERNS = ["2:4", "1:2:32+2:4"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``(arch, pattern) -> (sparse_dir, dense_masked_dir)``, written lazily once per module."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, pattern: str) -> tuple[Path, Path]:
        if (arch, pattern) not in cache:
            name = f"{arch}-{pattern.replace(':', '_').replace('+', '_')}"
            sparse = write_tiny_checkpoint(arch, root / name, pattern, seed=1, dense_masked_dir=root / f"{name}-dense")
            cache[arch, pattern] = (sparse, root / f"{name}-dense")
        return cache[arch, pattern]

    return get


def _load(path: Path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    return model.eval(), info


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_dense_masked_model(checkpoints, arch: str, pattern: str) -> None:
    sparse_dir, dense_dir = checkpoints(arch, pattern)
    sparse, info = _load(sparse_dir)
    dense, _ = _load(dense_dir)
    assert all(not v for v in info.values()), f"loading info not clean: { {k: v for k, v in info.items() if v} }"
    experts = [m for m in sparse.modules() if isinstance(m, SamoyedsExperts)]
    assert len(experts) == 2 and all(str(m.pattern) == pattern for m in experts)
    assert not any(isinstance(p, torch.Tensor) and p.is_meta for p in sparse.state_dict().values())
    ids = torch.tensor([[0, 17, 250, 9, 301, 44, 120, 5, 77], [0, 3, 3, 480, 12, 66, 200, 199, 8]])
    with torch.no_grad():
        got, want = sparse(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_values_follow_requested_dtype(checkpoints) -> None:
    sparse_dir, _ = checkpoints("qwen3_moe", "1:2:32+2:4")
    model, _ = _load(sparse_dir, dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_sp_values.dtype == torch.bfloat16 and experts.w13_sp_meta.dtype == torch.uint8
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 9]])).logits).all()


def test_corrupted_meta_names_the_checkpoint_tensor(checkpoints, tmp_path: Path) -> None:
    sparse_dir, _ = checkpoints("mixtral", "1:2:32+2:4")
    bad = _copy_checkpoint(sparse_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.3.w3.sp_meta"
    tensors[key][5, 2] = 0  # positions (0, 0): not strictly ascending
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"experts\.3\.w3\.sp_meta"):
        _load(bad)


def test_corrupted_rowsel_names_the_checkpoint_tensor(checkpoints, tmp_path: Path) -> None:
    sparse_dir, _ = checkpoints("qwen2_moe", "1:2:32+2:4")
    bad = _copy_checkpoint(sparse_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.experts.6.down_proj.sp_rowsel"][1, 0] = 2
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.6\.down_proj\.sp_rowsel"):
        _load(bad)


def test_missing_expert_tensor_fails_at_load(checkpoints, tmp_path: Path) -> None:
    sparse_dir, _ = checkpoints("olmoe", "2:4")
    bad = _copy_checkpoint(sparse_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.down_proj.sp_meta"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w2_sp_meta"):
        _load(bad)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = build_quantization_config("2:4")
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'llama' is not supported") as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(arch in str(err.value) for arch in SUPPORTED_MODEL_TYPES)


def test_register_is_idempotent() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert register() and register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["samoyeds"] is SamoyedsConfig
    assert AUTO_QUANTIZER_MAPPING["samoyeds"].__name__ == "SamoyedsHfQuantizer"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pattern": "3:4"}, "3:4"),
        ({"pattern": "2:4", "format_version": 2}, "format_version=2"),
        ({"pattern": "2:4", "targets": ["attention"]}, "targets"),
    ],
)
def test_config_rejects_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamoyedsConfig.from_dict({"quant_method": "samoyeds", **fields})


def test_config_round_trips() -> None:
    block = build_quantization_config("1:2:64+2:4", pruning={"method": "magnitude", "seed": 3})
    config = SamoyedsConfig.from_dict(block)
    assert {k: config.to_dict()[k] for k in block} == block
