"""Qwen2-MoE (Qwen1.5-MoE): ``Qwen2MoeExperts``; the dense ``shared_expert`` (+ its sigmoid gate) is untouched."""

from ._base import ExpertsPatch

PATCHES = (ExpertsPatch("qwen2_moe", ("Qwen2MoeExperts",), shared_modules=("shared_expert",)),)
