"""Sparsity patterns and the canonical, kernel-independent packed layout (docs/FORMAT.md)."""

from .packed import FORMAT_VERSION, SUFFIXES, VALUE_DTYPES, PackedWeight, pack, unpack, validate
from .pattern import SUPPORTED_CHUNKS, PatternKind, SparsityPattern, parse_pattern

__all__ = [
    "FORMAT_VERSION",
    "SUFFIXES",
    "SUPPORTED_CHUNKS",
    "VALUE_DTYPES",
    "PackedWeight",
    "PatternKind",
    "SparsityPattern",
    "pack",
    "parse_pattern",
    "unpack",
    "validate",
]
