"""Mask selection under a sparsity pattern (pure functions; convert/ orchestrates)."""

from .masks import magnitude_scores, select_mask

__all__ = ["magnitude_scores", "select_mask"]
