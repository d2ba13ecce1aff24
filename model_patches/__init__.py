"""Per-architecture Transformers patches (shipped as ``samoyeds_vllm.model_patches``).

Every patch is an *instance-level module swap* done by ``samoyeds_vllm.hf.SamoyedsHfQuantizer`` while the model
is still on the meta device: no Transformers class or function is monkey-patched globally. Each module below
declares one or more ``ExpertsPatch`` entries in ``PATCHES``.

* ``mixtral`` — MixtralExperts.
* ``qwen2_moe`` — Qwen2MoeExperts (shared expert stays dense).
* ``qwen3_moe`` — Qwen3MoeExperts.
* ``olmoe`` — OlmoeExperts.
* ``deepseek_v2`` — DeepseekV2Experts and DeepseekV3Experts (same layout; shared experts stay dense).

For all of them:

- **Why:** Transformers holds routed experts as dense fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
  parameters and has no sparse expert implementation, so a samoyeds checkpoint (packed ``sp_*`` tensors) cannot
  be loaded or run as is.
- **How:** ``_process_model_before_weight_loading`` replaces each ``*.mlp.experts`` module whose class is listed in
  ``experts_classes`` with ``SamoyedsExperts`` (stacked packed buffers ``w13_sp_*`` / ``w2_sp_*``, same
  ``forward(hidden_states, top_k_index, top_k_weights)``, calling ``samoyeds::moe_sparse``);
  ``update_weight_conversions`` adds ``WeightConverter``s that stack the per-expert checkpoint tensors.
  Routers, shared experts, attention and norms are the stock modules.
- **Upstream status:** none; Transformers' quantizer API (``register_quantization_config`` /
  ``register_quantizer``) is the supported extension point and is all we use. The per-architecture facts here are
  the experts class name and the checkpoint projection names.
- **Removal plan:** an entry goes away if Transformers gains a pluggable experts backend that accepts packed
  weights (``experts_implementation``); the module swap then becomes a registration.
"""

from __future__ import annotations

import importlib

from ._base import ExpertsPatch

__all__ = ["PATCH_MODULES", "ExpertsPatch", "get_patch", "supported_model_types"]

#: model_type -> module of this package that holds its patch.
PATCH_MODULES: dict[str, str] = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v2",
}


def supported_model_types() -> tuple[str, ...]:
    """Model types with a patch."""
    return tuple(PATCH_MODULES)


def get_patch(model_type: str) -> ExpertsPatch:
    """The patch for ``model_type``.

    Raises
    ------
    ValueError
        If no patch exists; the message lists the supported model types.
    """
    module_name = PATCH_MODULES.get(model_type)
    if module_name is None:
        raise ValueError(
            f"samoyeds: model_type {model_type!r} is not supported in Transformers; supported: "
            f"{', '.join(PATCH_MODULES)}"
        )
    module = importlib.import_module(f"{__name__}.{module_name}")
    return next(patch for patch in module.PATCHES if patch.model_type == model_type)
