"""``SamoyedsConfig``: the vLLM quantization config of samoyeds sparse checkpoints.

Importing this module registers the config under ``quant_method = "samoyeds"`` (the class is pickled across
vLLM processes, so it must be registered in the module that defines it). vLLM then picks it up from
``config.json``'s ``quantization_config`` without flags, and accepts ``--quantization samoyeds``.

The config block it reads (docs/FORMAT.md)::

    "quantization_config": {"quant_method": "samoyeds", "format_version": 1, "pattern": "1:2:32+2:4",
                            "targets": ["experts"], "ignore": [], "pruning": {...provenance...}}
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..formats import FORMAT_VERSION, VALUE_DTYPES, SparsityPattern, parse_pattern
from ._compat import (
    LinearBase,
    QuantizationConfig,
    QuantizeMethodBase,
    RoutedExperts,
    UnquantizedLinearMethod,
    register_quantization_config,
)

__all__ = ["QUANT_METHOD", "SUPPORTED_TARGETS", "SamoyedsConfig"]

logger = logging.getLogger(__name__)

#: ``quant_method`` value in config.json and the ``--quantization`` name.
QUANT_METHOD = "samoyeds"

#: Module groups the vLLM plugin can run sparse. Only routed experts (fused-MoE layers) for now.
SUPPORTED_TARGETS: tuple[str, ...] = ("experts",)

# Keys of the quantization_config block; anything else is rejected so a newer writer cannot be misread.
_KNOWN_KEYS = frozenset({"quant_method", "format_version", "pattern", "targets", "ignore", "pruning"})


@register_quantization_config(QUANT_METHOD)
class SamoyedsConfig(QuantizationConfig):
    """Samoyeds sparse experts: routed experts stored packed in ``pattern``, every other layer dense.

    Parameters
    ----------
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"`` (V in 32, 64, 128, 256).
    format_version:
        Version of the packed layout; must equal ``samoyeds_vllm.formats.FORMAT_VERSION``.
    targets:
        Module groups stored sparse; only ``["experts"]`` is supported.
    ignore:
        Module names kept dense although targeted; a fused-MoE layer whose name (or a parent's) is listed
        runs vLLM's dense method.
    pruning:
        Provenance of the masks (method, calibration...), kept for ``repr`` and logs only.

    Raises
    ------
    ValueError
        For an unknown format version, pattern or target, naming the value found and what is supported.
    """

    def __init__(
        self,
        pattern: str | SparsityPattern,
        format_version: int = FORMAT_VERSION,
        targets: list[str] | tuple[str, ...] = SUPPORTED_TARGETS,
        ignore: list[str] | tuple[str, ...] = (),
        pruning: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(format_version, bool) or not isinstance(format_version, int):
            raise ValueError(f"samoyeds quantization_config: format_version must be an integer, got {format_version!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"samoyeds quantization_config: format_version {format_version} is not supported by this "
                f"samoyeds-vllm (it reads format_version {FORMAT_VERSION}); re-convert the checkpoint with a "
                "matching samoyeds-convert or upgrade samoyeds-vllm"
            )
        try:
            self.pattern = parse_pattern(pattern)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"samoyeds quantization_config: {exc}") from exc
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"samoyeds quantization_config: targets must be a list of strings, got {targets!r}")
        unknown = [t for t in targets if t not in SUPPORTED_TARGETS]
        if unknown or not targets:
            raise ValueError(
                f"samoyeds quantization_config: targets {list(targets)} not supported; the vLLM plugin runs "
                f"{list(SUPPORTED_TARGETS)} sparse (unknown: {unknown or 'none given'})"
            )
        if isinstance(ignore, str) or not all(isinstance(t, str) for t in ignore):
            raise ValueError(f"samoyeds quantization_config: ignore must be a list of strings, got {ignore!r}")
        self.format_version = format_version
        self.targets = tuple(targets)
        self.ignore = tuple(ignore)
        self.pruning = dict(pruning or {})

    def __repr__(self) -> str:
        return (
            f"SamoyedsConfig(pattern={str(self.pattern)!r}, format_version={self.format_version}, "
            f"targets={list(self.targets)}, ignore={list(self.ignore)})"
        )

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return list(VALUE_DTYPES)

    @classmethod
    def get_min_capability(cls) -> int:
        # The CPU reference runs anywhere; the CUDA kernels pick themselves per device in ops/.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The block lives in config.json, which vLLM passes to from_config directly.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SamoyedsConfig:
        """Build from config.json's ``quantization_config`` block.

        Raises
        ------
        ValueError
            For a block that is not ``quant_method: samoyeds``, lacks ``pattern``, carries unknown keys, or
            holds an unsupported ``format_version``, ``pattern`` or ``targets``.
        """
        if not isinstance(config, dict):
            raise ValueError(f"samoyeds quantization_config must be a JSON object, got {type(config).__name__}")
        method = config.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"samoyeds quantization_config: quant_method is {method!r}, expected {QUANT_METHOD!r}")
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(
                f"samoyeds quantization_config: unknown keys {unknown}; format_version "
                f"{config.get('format_version')} knows {sorted(_KNOWN_KEYS)}"
            )
        for key in ("format_version", "pattern"):
            if key not in config:
                raise ValueError(
                    f"samoyeds quantization_config: missing {key!r}; the checkpoint was not written by "
                    "samoyeds-convert or is damaged"
                )
        return cls(
            pattern=config["pattern"],
            format_version=config["format_version"],
            targets=config.get("targets", list(SUPPORTED_TARGETS)),
            ignore=config.get("ignore", []),
            pruning=config.get("pruning"),
        )

    def is_ignored(self, prefix: str) -> bool:
        """True when module ``prefix`` (or a parent module) is listed in ``ignore``."""
        return any(prefix == name or prefix.startswith(f"{name}.") for name in self.ignore)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """Sparse method for fused-MoE layers, the dense method for every other linear layer.

        Routers (``*.gate``), attention, shared experts and the LM head stay dense. Layers that are neither
        (embeddings, attention's KV cache) get None, which vLLM reads as "unquantized".
        """
        if isinstance(layer, RoutedExperts):
            if self.is_ignored(prefix):
                logger.debug("samoyeds: %s is in ignore, keeping it dense", prefix)
                return None
            from .moe import SamoyedsMoEMethod

            return SamoyedsMoEMethod(self, layer.moe_config)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None
