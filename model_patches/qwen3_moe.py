"""Qwen3-MoE: ``Qwen3MoeExperts`` (no shared expert)."""

from ._base import ExpertsPatch

PATCHES = (ExpertsPatch("qwen3_moe", ("Qwen3MoeExperts",)),)
