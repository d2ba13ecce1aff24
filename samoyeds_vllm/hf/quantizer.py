"""Transformers integration: the ``samoyeds`` quantization config and ``HfQuantizer``.

Importing this module imports Transformers; ``samoyeds_vllm.hf.register`` does it lazily.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..convert.architectures import get_layout
from ..formats import FORMAT_VERSION, SUFFIXES, PackedWeight, parse_pattern, validate
from ..model_patches import ExpertsPatch, get_patch
from . import register
from .experts import SamoyedsExperts

__all__ = ["QUANT_METHOD", "SamoyedsConfig", "SamoyedsHfQuantizer"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "samoyeds"


class SamoyedsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a samoyeds checkpoint (docs/FORMAT.md).

    Parameters
    ----------
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    format_version:
        Layout version the checkpoint was written with; must be ``formats.FORMAT_VERSION``.
    targets:
        What is sparse; only ``["experts"]`` (routed experts) exists.
    ignore:
        Key prefixes of routed experts kept dense in the checkpoint.
    pruning:
        Provenance of the masks (method and settings), stored, not used.

    Raises
    ------
    ValueError
        For an unknown pattern, format version or target.
    """

    def __init__(
        self,
        pattern: str,
        format_version: int = FORMAT_VERSION,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        pruning: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.pattern = str(parse_pattern(pattern))
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config.format_version={format_version}: this samoyeds-vllm reads format_version "
                f"{FORMAT_VERSION}; upgrade samoyeds-vllm or re-convert the checkpoint"
            )
        self.format_version = format_version
        self.targets = list(targets) if targets is not None else ["experts"]
        if self.targets != ["experts"]:
            raise ValueError(f"quantization_config.targets={self.targets}: only ['experts'] is supported")
        self.ignore = list(ignore or [])
        self.pruning = dict(pruning or {})
        unused = {k: v for k, v in kwargs.items() if k != "quant_method"}
        if unused:
            logger.debug("samoyeds quantization_config: ignoring unknown fields %s", sorted(unused))


def _converters(patch: ExpertsPatch) -> list[WeightConverter]:
    """Stack per-expert packed tensors into ``SamoyedsExperts`` buffers (after Transformers' own renamings)."""
    out = []
    for suffix in SUFFIXES:
        out.append(
            WeightConverter(
                source_patterns=[f"mlp.experts.*.{patch.gate}.{suffix}", f"mlp.experts.*.{patch.up}.{suffix}"],
                target_patterns=f"mlp.experts.w13_{suffix}",
                operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
            )
        )
        out.append(
            WeightConverter(
                source_patterns=f"mlp.experts.*.{patch.down}.{suffix}",
                target_patterns=f"mlp.experts.w2_{suffix}",
                operations=[MergeModulelist(dim=0)],
            )
        )
    return out


class SamoyedsHfQuantizer(HfQuantizer):
    """Loads samoyeds checkpoints: swaps routed experts for ``SamoyedsExperts`` and stacks packed tensors.

    Lifecycle (driven by ``from_pretrained``): ``_process_model_before_weight_loading`` swaps modules on the meta
    device; ``update_weight_conversions`` adds the stacking converters; after loading,
    ``_process_model_after_weight_loading`` validates every packed tensor (``formats.validate``) and casts values
    to the requested dtype.
    """

    requires_calibration = True

    def __init__(self, quantization_config: SamoyedsConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._patch: ExpertsPatch | None = None
        self._dtype: torch.dtype | None = None

    def _is_ignored(self, module_name: str, moe_module: str) -> bool:
        on_disk = re.sub(r"\.mlp\.", f".{moe_module}.", module_name, count=1)
        return any(
            name.startswith(prefix) for prefix in self.quantization_config.ignore for name in (module_name, on_disk)
        )

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        config = model.config.get_text_config()
        patch = get_patch(config.model_type)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"samoyeds: hidden_act={config.hidden_act!r} is not supported; experts must be SwiGLU (silu)"
            )
        self._patch = patch
        moe_module = get_layout(config.model_type).moe_module
        swapped = 0
        for name, module in list(model.named_modules()):
            if type(module).__name__ not in patch.experts_classes or self._is_ignored(name, moe_module):
                continue
            num_experts, two_i, hidden = module.gate_up_proj.shape
            # The model is built in the requested dtype (``from_pretrained(dtype=...)``); values follow it.
            values_dtype = module.gate_up_proj.dtype
            self._dtype = values_dtype
            experts = SamoyedsExperts(
                num_experts, hidden, two_i // 2, self.quantization_config.pattern, values_dtype, "meta", name
            )
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child] = experts
            swapped += 1
        if swapped == 0:
            raise ValueError(
                f"samoyeds: found no experts module of class {list(patch.experts_classes)} in "
                f"{type(model).__name__}; this Transformers version may have renamed it"
            )
        logger.info(
            "samoyeds: %d experts modules of %s use pattern %s",
            swapped,
            config.model_type,
            self.quantization_config.pattern,
        )
        return model

    def update_weight_conversions(self, weight_conversions):
        if self._patch is None:
            return weight_conversions
        return _converters(self._patch) + list(weight_conversions)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        for module in model.modules():
            if not isinstance(module, SamoyedsExperts):
                continue
            module.check_shapes()
            try:
                module.check_loaded()
            except ValueError as err:
                raise ValueError(
                    f"samoyeds checkpoint {model.config.name_or_path}: {self._locate(module, err)}"
                ) from err
            if self._dtype is not None and module.w13_sp_values.dtype != self._dtype:
                module.w13_sp_values = module.w13_sp_values.to(self._dtype)
                module.w2_sp_values = module.w2_sp_values.to(self._dtype)
        self._cast_stray_parameters(model)
        return model

    def _cast_stray_parameters(self, model) -> None:
        """Cast floating parameters that kept the checkpoint dtype to the requested one.

        Seen with Transformers 5.17 + Mixtral in bf16: tensors renamed by a weight conversion (the router,
        ``block_sparse_moe.gate`` -> ``mlp.gate``) stayed float32 while the model ran in bf16. Modules the
        model keeps in fp32 on purpose (``_keep_in_fp32_modules``) are left alone.
        """
        if self._dtype is None:
            return
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != self._dtype and not any(k in name for k in keep):
                param.data = param.data.to(self._dtype)

    def _locate(self, module: SamoyedsExperts, err: ValueError) -> str:
        """Re-validate expert by expert to name the checkpoint tensor at fault; fall back to ``err``."""
        patch = self._patch
        moe_module = get_layout(patch.model_type).moe_module
        prefix = re.sub(r"\.mlp\.experts$", f".{moe_module}.experts", module.module_name)
        for weight, halves in (("w13", (patch.gate, patch.up)), ("w2", (patch.down,))):
            stacked = module.packed(weight)
            for expert in range(module.num_experts):
                one = PackedWeight(
                    stacked.pattern,
                    stacked.values[expert],
                    stacked.meta[expert],
                    None if stacked.rowsel is None else stacked.rowsel[expert],
                )
                out_features = one.out_features // len(halves)
                for i, proj in enumerate(halves):
                    part = one.slice_out_features(i * out_features, (i + 1) * out_features) if len(halves) > 1 else one
                    try:
                        validate(part, name=f"{prefix}.{expert}.{proj}")
                    except ValueError as located:
                        return str(located)
        return str(err)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


# Importing this module directly (before Transformers' quantizer registry finished importing) must still register.
register()
