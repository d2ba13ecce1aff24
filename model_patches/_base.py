"""What a per-architecture patch declares (shared by every module of ``samoyeds_vllm.model_patches``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExpertsPatch"]


@dataclass(frozen=True)
class ExpertsPatch:
    """How to swap one architecture's routed experts for ``samoyeds_vllm.hf.SamoyedsExperts``.

    Attributes
    ----------
    model_type:
        Hugging Face ``config.model_type``.
    experts_classes:
        Class names of the Transformers modules replaced (fused ``gate_up_proj [E, 2I, H]``,
        ``down_proj [E, H, I]``, ``forward(hidden_states, top_k_index, top_k_weights)``).
    gate, up, down:
        Per-expert projection names in checkpoint keys (``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/
        ``down_proj``); the loader stacks ``...experts.{e}.{gate|up}.sp_*`` into ``w13_sp_*`` and
        ``...experts.{e}.{down}.sp_*`` into ``w2_sp_*``.
    shared_modules:
        Dense shared-expert modules beside ``experts`` that stay untouched.
    """

    model_type: str
    experts_classes: tuple[str, ...]
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    shared_modules: tuple[str, ...] = ()
