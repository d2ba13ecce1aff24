"""SamoyedsConfig and register() without an engine: parsing, validation errors, method selection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from samoyeds_vllm.formats import FORMAT_VERSION, parse_pattern
from samoyeds_vllm.vllm_plugin import register
from samoyeds_vllm.vllm_plugin.config import SamoyedsConfig

GOOD = {
    "quant_method": "samoyeds",
    "format_version": FORMAT_VERSION,
    "pattern": "1:2:32+2:4",
    "targets": ["experts"],
    "ignore": [],
    "pruning": {"method": "magnitude"},
}


def test_register_is_idempotent_and_registers_the_config():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    register()
    register()
    assert get_quantization_config("samoyeds") is SamoyedsConfig
    assert QUANTIZATION_METHODS.count("samoyeds") == 1


@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4", "1:2:64+2:4", "1:2:128+2:4", "1:2:256+2:4"])
def test_from_config_reads_every_supported_pattern(pattern):
    config = SamoyedsConfig.from_config({**GOOD, "pattern": pattern})
    assert config.pattern == parse_pattern(pattern)
    assert config.get_name() == "samoyeds"
    assert config.targets == ("experts",)
    assert "pattern=" in repr(config)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format_version": 2}, r"format_version 2 is not supported .*reads format_version 1"),
        ({"format_version": "1"}, r"format_version must be an integer, got '1'"),
        ({"format_version": True}, r"format_version must be an integer"),
        ({"pattern": "1:2:48+2:4"}, r"V in \[32, 64, 128, 256\], got V=48"),
        ({"pattern": "3:4"}, r"unknown sparsity pattern '3:4'"),
        ({"pattern": 24}, r"pattern must be a string"),
        ({"targets": ["attention"]}, r"targets \['attention'\] not supported.*unknown: \['attention'\]"),
        ({"targets": []}, r"targets \[\] not supported"),
        ({"targets": "experts"}, r"targets must be a list of strings"),
        ({"ignore": "lm_head"}, r"ignore must be a list of strings"),
        ({"quant_method": "gptq"}, r"quant_method is 'gptq', expected 'samoyeds'"),
        ({"block_size": 16}, r"unknown keys \['block_size'\]"),
    ],
)
def test_from_config_rejects_bad_blocks_with_a_clear_message(change, match):
    with pytest.raises(ValueError, match=match):
        SamoyedsConfig.from_config({**GOOD, **change})


@pytest.mark.parametrize("key", ["pattern", "format_version"])
def test_from_config_requires_pattern_and_version(key):
    block = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing '{key}'"):
        SamoyedsConfig.from_config(block)


def _bare(cls, **attrs):
    """An instance of a vLLM layer class without running its constructor (get_quant_method only dispatches)."""
    obj = cls.__new__(cls)
    for name, value in attrs.items():
        object.__setattr__(obj, name, value)
    return obj


def test_get_quant_method_dispatch():
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from samoyeds_vllm.vllm_plugin.moe import SamoyedsMoEMethod

    config = SamoyedsConfig.from_config({**GOOD, "ignore": ["model.layers.1.mlp.experts"]})
    moe = SimpleNamespace(activation="silu", is_act_and_mul=True, tp_size=1, tp_rank=0)
    experts = _bare(RoutedExperts, moe_config=moe)
    method = config.get_quant_method(experts, "model.layers.0.mlp.experts")
    assert isinstance(method, SamoyedsMoEMethod)
    assert method.pattern == parse_pattern("1:2:32+2:4")
    assert config.get_quant_method(experts, "model.layers.1.mlp.experts") is None  # ignored: vLLM's dense method
    for cls, prefix in [
        (GateLinear, "model.layers.0.mlp.gate"),
        (QKVParallelLinear, "model.layers.0.self_attn.qkv_proj"),
        (RowParallelLinear, "model.layers.0.mlp.shared_expert.down_proj"),
    ]:
        assert isinstance(config.get_quant_method(_bare(cls), prefix), UnquantizedLinearMethod), cls
    assert config.get_quant_method(_bare(VocabParallelEmbedding), "model.embed_tokens") is None


def test_register_fails_loudly(monkeypatch):
    import sys

    import samoyeds_vllm.vllm_plugin as plugin

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delattr(plugin, "config", raising=False)
    monkeypatch.setitem(sys.modules, "samoyeds_vllm.vllm_plugin.config", None)  # the import now raises
    with pytest.raises(RuntimeError, match="registering the vLLM plugin failed"):
        plugin.register()
    assert plugin._registered is False
