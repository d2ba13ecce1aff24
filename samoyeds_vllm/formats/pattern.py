"""Sparsity patterns: the one place where pattern strings are parsed.

Two structured patterns exist, for a weight ``W[O, I]`` (O output features, I input features = reduction dim):

* ``"2:4"`` — along I, every aligned group of 4 holds at most 2 nonzeros (50% density).
* ``"1:2:V+2:4"`` (V in {32, 64, 128, 256}), called *samoyeds* — output rows are paired (2p, 2p+1), I is cut
  into chunks of V; in every (pair, chunk) one row is kept and its segment is 2:4 along I (25% density).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["SUPPORTED_CHUNKS", "PatternKind", "SparsityPattern", "parse_pattern"]

#: Chunk lengths V accepted by the ``1:2:V+2:4`` pattern.
SUPPORTED_CHUNKS: tuple[int, ...] = (32, 64, 128, 256)

#: Input features covered by one metadata byte (two 2:4 groups of four).
META_SPAN = 8

_SAMOYEDS_RE = re.compile(r"^1:2:(\d+)\+2:4$")


class PatternKind(str, enum.Enum):
    """Family of a structured sparsity pattern."""

    TWO_FOUR = "2:4"
    SAMOYEDS = "1:2:V+2:4"


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed structured sparsity pattern.

    Attributes
    ----------
    kind:
        ``PatternKind.TWO_FOUR`` or ``PatternKind.SAMOYEDS``.
    chunk:
        V, the input-feature chunk length of the row-pair selection; 0 for plain 2:4.
    """

    kind: PatternKind
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind is PatternKind.TWO_FOUR and self.chunk != 0:
            raise ValueError(f"pattern 2:4 takes no chunk length, got V={self.chunk}")
        if self.kind is PatternKind.SAMOYEDS and self.chunk not in SUPPORTED_CHUNKS:
            raise ValueError(f"pattern 1:2:V+2:4 needs V in {list(SUPPORTED_CHUNKS)}, got V={self.chunk}")

    def __str__(self) -> str:
        if self.kind is PatternKind.TWO_FOUR:
            return "2:4"
        return f"1:2:{self.chunk}+2:4"

    @property
    def is_samoyeds(self) -> bool:
        """True for the row-pair ``1:2:V+2:4`` pattern."""
        return self.kind is PatternKind.SAMOYEDS

    @property
    def row_group(self) -> int:
        """Output rows that share one kept row: 2 for samoyeds, 1 for 2:4."""
        return 2 if self.is_samoyeds else 1

    @property
    def col_multiple(self) -> int:
        """I must be a multiple of this: V for samoyeds, 8 (one metadata byte) for 2:4."""
        return self.chunk if self.is_samoyeds else META_SPAN

    @property
    def density(self) -> float:
        """Fraction of weights that may be nonzero: 0.5 for 2:4, 0.25 for samoyeds."""
        return 0.5 / self.row_group

    def check_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        """Raise ValueError unless a dense ``[O, I]`` weight can be stored in this pattern.

        Parameters
        ----------
        out_features, in_features:
            O and I of the dense weight.
        name:
            Tensor name used in the error message.
        """
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"{name}: pattern {self} needs a non-empty [O, I], got [{out_features}, {in_features}]")
        if out_features % self.row_group:
            raise ValueError(f"{name}: pattern {self} pairs output rows, so O must be even; got O={out_features}")
        if in_features % self.col_multiple:
            what = f"V={self.chunk}" if self.is_samoyeds else "8 (one metadata byte = two groups of 4)"
            raise ValueError(
                f"{name}: pattern {self} needs I to be a multiple of {what}; got I={in_features}"
                + (f" (I % V = {in_features % self.chunk}; choose a V that divides I)" if self.is_samoyeds else "")
            )

    def bytes_per_weight(self, value_bytes: int) -> float:
        """Stored bytes per dense weight element for values of ``value_bytes`` bytes (exact, no padding)."""
        kept_rows = 1.0 / self.row_group
        values = kept_rows * 0.5 * value_bytes
        meta = kept_rows / META_SPAN
        rowsel = (1.0 / (2 * self.chunk)) if self.is_samoyeds else 0.0
        return values + meta + rowsel


def parse_pattern(spec: str | SparsityPattern) -> SparsityPattern:
    """Parse a pattern string such as ``"2:4"`` or ``"1:2:128+2:4"``.

    Raises
    ------
    ValueError
        If the string is not one of the supported spellings.
    """
    if isinstance(spec, SparsityPattern):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a string like '2:4' or '1:2:128+2:4', got {type(spec).__name__}")
    text = spec.strip().replace(" ", "")
    if text == "2:4":
        return SparsityPattern(PatternKind.TWO_FOUR)
    match = _SAMOYEDS_RE.match(text)
    if match:
        return SparsityPattern(PatternKind.SAMOYEDS, int(match.group(1)))
    chunks = ", ".join(f"'1:2:{v}+2:4'" for v in SUPPORTED_CHUNKS)
    raise ValueError(f"unknown sparsity pattern {spec!r}; supported: '2:4', {chunks}")
