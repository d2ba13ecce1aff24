"""Supported MoE architectures and where their routed-expert weights live in a checkpoint.

Two key layouts exist for the same weights:

* **per-expert** (what Hugging Face checkpoints on disk use, and what ``save_pretrained`` in Transformers 5 still
  writes): ``{layer}.{moe}.experts.{e}.{gate|up|down}.weight``, each ``[O, I]``;
* **fused** (what a Transformers 5 model holds in memory, ``model.state_dict()``):
  ``{layer}.mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``{layer}.mlp.experts.down_proj
  [E, H, I]``.

Both are read; the sparse checkpoint is always written per-expert with the on-disk names (vLLM's expert mapping
needs them), e.g. ``model.layers.0.block_sparse_moe.experts.3.w1.sp_values`` for Mixtral.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ExpertKey",
    "ExpertLayout",
    "FusedExpertKey",
    "get_layout",
    "parse_expert_key",
    "parse_fused_key",
]


@dataclass(frozen=True)
class ExpertLayout:
    """Checkpoint naming of one architecture's routed experts.

    Attributes
    ----------
    model_type:
        Hugging Face ``config.model_type``.
    moe_module:
        Name of the MoE block inside a decoder layer in the on-disk keys (``block_sparse_moe`` for Mixtral,
        ``mlp`` otherwise). Transformers 5 always names it ``mlp`` in memory.
    gate, up, down:
        Per-expert projection names: W1 (gate) ``[I, H]``, W3 (up) ``[I, H]``, W2 (down) ``[H, I]``.
    shared_modules:
        Names of dense shared-expert modules beside ``experts`` (kept dense by default).
    """

    model_type: str
    moe_module: str
    gate: str
    up: str
    down: str
    shared_modules: tuple[str, ...] = ()

    @property
    def projections(self) -> tuple[str, str, str]:
        """``(gate, up, down)`` names."""
        return (self.gate, self.up, self.down)

    def expert_key(self, layer_prefix: str, expert: int, proj: str, suffix: str) -> str:
        """On-disk key of one expert tensor, e.g. ``model.layers.0.mlp.experts.3.gate_proj.sp_values``."""
        return f"{layer_prefix}.{self.moe_module}.experts.{expert}.{proj}.{suffix}"


_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")

_LAYOUTS: dict[str, ExpertLayout] = {
    "mixtral": ExpertLayout("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ExpertLayout("qwen2_moe", "mlp", *_GATE_UP_DOWN, shared_modules=("shared_expert",)),
    "qwen3_moe": ExpertLayout("qwen3_moe", "mlp", *_GATE_UP_DOWN),
    "olmoe": ExpertLayout("olmoe", "mlp", *_GATE_UP_DOWN),
    "deepseek_v2": ExpertLayout("deepseek_v2", "mlp", *_GATE_UP_DOWN, shared_modules=("shared_experts",)),
    "deepseek_v3": ExpertLayout("deepseek_v3", "mlp", *_GATE_UP_DOWN, shared_modules=("shared_experts",)),
}

#: ``config.model_type`` values we convert and load.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_LAYOUTS)


def get_layout(model_type: str) -> ExpertLayout:
    """The expert layout of ``model_type``.

    Raises
    ------
    ValueError
        If the architecture is not supported; the message lists the supported ones.
    """
    layout = _LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported by samoyeds; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layout


@dataclass(frozen=True)
class ExpertKey:
    """A parsed per-expert dense key ``{layer_prefix}.{moe}.experts.{expert}.{proj}.weight``."""

    layer_prefix: str
    expert: int
    proj: str


@dataclass(frozen=True)
class FusedExpertKey:
    """A parsed fused key ``{layer_prefix}.mlp.experts.{gate_up_proj|down_proj}``."""

    layer_prefix: str
    name: str


def _per_expert_regex(layout: ExpertLayout) -> re.Pattern[str]:
    # The moe module may appear under its on-disk name or Transformers' in-memory name "mlp".
    moe = "|".join(sorted({re.escape(layout.moe_module), "mlp"}))
    projs = "|".join(re.escape(p) for p in layout.projections)
    return re.compile(rf"^(?P<layer>.+)\.(?:{moe})\.experts\.(?P<expert>\d+)\.(?P<proj>{projs})\.weight$")


_FUSED = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<name>gate_up_proj|down_proj)$")


def parse_expert_key(key: str, layout: ExpertLayout) -> ExpertKey | None:
    """Parse a per-expert dense weight key; None for every other key (shared experts included)."""
    match = _per_expert_regex(layout).match(key)
    if match is None:
        return None
    return ExpertKey(match["layer"], int(match["expert"]), match["proj"])


def parse_fused_key(key: str) -> FusedExpertKey | None:
    """Parse a fused (Transformers 5 in-memory) expert key; None for every other key."""
    match = _FUSED.match(key)
    if match is None:
        return None
    return FusedExpertKey(match["layer"], match["name"])
