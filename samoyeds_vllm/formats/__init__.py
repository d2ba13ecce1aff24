"""Sparsity patterns and the canonical, kernel-independent packed layout (docs/FORMAT.md)."""

from .packed import FORMAT_VERSION, SUFFIXES, VALUE_DTYPES, PackedWeight, pack, packed_shapes, unpack, validate
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
    "packed_shapes",
    "parse_pattern",
    "unpack",
    "validate",
]
