"""convert.sparsify / convert.architectures: keys, masks, both expert layouts, shape validation."""

from __future__ import annotations

import pytest
import torch
from fixtures import build_tiny_model
from transformers.core_model_loading import revert_weight_conversion

from samoyeds_vllm.convert import (
    SUPPORTED_MODEL_TYPES,
    build_quantization_config,
    check_expert_shapes,
    get_layout,
    sparsify_state_dict,
)
from samoyeds_vllm.formats import FORMAT_VERSION, pack, parse_pattern, unpack

PATTERNS = ["2:4", "1:2:32+2:4"]


def _dense(arch: str, fused: bool = False) -> dict[str, torch.Tensor]:
    model = build_tiny_model(arch, seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return state if fused else revert_weight_conversion(model, state)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_expert_keys_masks_and_copies(arch: str, pattern: str) -> None:
    dense = _dense(arch)
    layout = get_layout(arch)
    result = sparsify_state_dict(dense, arch, pattern)
    parsed = parse_pattern(pattern)
    suffixes = ["sp_meta", "sp_rowsel", "sp_values"] if parsed.is_samoyeds else ["sp_meta", "sp_values"]

    expert_keys = [k for k in dense if ".experts." in k and "shared" not in k]
    assert set(result.masks) == set(expert_keys) and len(expert_keys) == 2 * 8 * 3
    for key in expert_keys:
        stem = key.removesuffix(".weight")
        assert sorted(k.rsplit(".", 1)[1] for k in result.tensors if k.startswith(stem + ".")) == suffixes
        mask, weight = result.masks[key], dense[key]
        assert mask.float().mean().item() == pytest.approx(parsed.density)
        packed = pack(weight, mask, parsed)  # raises if the mask breaks the pattern
        assert torch.equal(unpack(packed), weight * mask)
        assert torch.equal(result.tensors[f"{stem}.sp_values"], packed.values)
    # every non-expert tensor (routers, attention, norms, shared experts) is copied as is
    for key, tensor in dense.items():
        if key not in result.masks:
            assert result.tensors[key] is tensor
    assert any(f".{layout.moe_module}.gate.weight" in k for k in result.tensors)
    for shared in layout.shared_modules:
        assert any(f".{shared}.gate_proj.weight" in k for k in result.tensors)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_fused_layout_gives_the_same_checkpoint(arch: str) -> None:
    per_expert = sparsify_state_dict(_dense(arch), arch, "1:2:32+2:4")
    fused_input = _dense(arch, fused=True)
    assert any(k.endswith("experts.gate_up_proj") for k in fused_input)
    fused = sparsify_state_dict(fused_input, arch, "1:2:32+2:4")
    assert fused.tensors.keys() == per_expert.tensors.keys()
    for key, tensor in per_expert.tensors.items():
        assert torch.equal(fused.tensors[key], tensor), key


def test_streaming_input_and_ignore() -> None:
    dense = _dense("qwen3_moe")
    result = sparsify_state_dict(iter(dense.items()), "qwen3_moe", "2:4", ignore=["model.layers.1."], keep_masks=False)
    assert result.masks == {}
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in result.tensors
    assert "model.layers.0.mlp.experts.0.gate_proj.sp_values" in result.tensors
    assert not any(k.startswith("model.layers.1.") and k.endswith("sp_values") for k in result.tensors)


def test_unsupported_model_type_lists_supported() -> None:
    with pytest.raises(ValueError, match="'llama' is not supported") as err:
        sparsify_state_dict({"model.embed_tokens.weight": torch.zeros(4, 4)}, "llama", "2:4")
    assert all(arch in str(err.value) for arch in SUPPORTED_MODEL_TYPES)


def test_no_experts_found() -> None:
    with pytest.raises(ValueError, match="no routed-expert weights"):
        sparsify_state_dict({"model.embed_tokens.weight": torch.zeros(4, 4)}, "mixtral", "2:4")


def test_check_expert_shapes_names_the_bad_key() -> None:
    shapes = {k: tuple(v.shape) for k, v in _dense("olmoe").items()}
    assert check_expert_shapes(shapes, "olmoe", "1:2:64+2:4") == 2 * 8 * 3
    shapes["model.layers.1.mlp.experts.5.down_proj.weight"] = (128, 96)
    with pytest.raises(ValueError, match=r"experts\.5\.down_proj"):
        check_expert_shapes(shapes, "olmoe", "1:2:64+2:4")


def test_quantization_config_block() -> None:
    block = build_quantization_config("1:2:32+2:4", ignore=["model.layers.0."], pruning={"method": "magnitude"})
    assert block == {
        "quant_method": "samoyeds",
        "format_version": FORMAT_VERSION,
        "pattern": "1:2:32+2:4",
        "targets": ["experts"],
        "ignore": ["model.layers.0."],
        "pruning": {"method": "magnitude"},
    }
