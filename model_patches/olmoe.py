"""OLMoE: ``OlmoeExperts`` (no shared expert)."""

from ._base import ExpertsPatch

PATCHES = (ExpertsPatch("olmoe", ("OlmoeExperts",)),)
