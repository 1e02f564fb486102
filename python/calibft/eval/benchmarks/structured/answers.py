"""Validity rules of a generated sample (docs/benchmarks/structured.md).

A generation is valid if, after removing any reasoning trace (`calibft.eval.text`), the stripped
text fully matches a decimal or scientific-notation literal, is finite, lies within the family's
support and, for integer families, is integral. Parsing never raises on malformed text: such a
generation is simply invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from calibft.distributions import get_family, support
from calibft.eval.text import strip_reasoning

# re.ASCII: `\d` would otherwise also match e.g. Arabic-Indic digits, which float() accepts.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)

INTEGER_TOLERANCE = 1e-9


def parse_number(text: str) -> float:
    """The number a completion states, or nan if it is not exactly one finite numeric literal."""
    answer = strip_reasoning(text).strip()
    if _NUMBER.fullmatch(answer) is None:
        return math.nan
    value = float(answer)  # cannot raise on a matched literal; huge exponents give inf
    return value if math.isfinite(value) else math.nan


@dataclass(frozen=True)
class ParsedSamples:
    """Parsed generations of one prompt: `values` (nan where invalid) and the `valid` mask."""

    values: np.ndarray  # float64[n]
    valid: np.ndarray  # bool[n]

    @property
    def valid_rate(self) -> float:
        """Fraction of valid generations (nan for zero generations)."""
        return float(self.valid.mean()) if self.valid.size else math.nan

    @property
    def valid_values(self) -> np.ndarray:
        return self.values[self.valid]


def parse_samples(
    texts: Iterable[str], family_id: str, params: Mapping[str, float]
) -> ParsedSamples:
    """Apply docs/benchmarks/structured.md's validity rules to every generation of one prompt."""
    lo, hi = support(family_id, params)
    values = np.array([parse_number(text) for text in texts], dtype=np.float64)
    with np.errstate(invalid="ignore"):  # nan compares False, so invalid stays invalid
        valid = (values >= lo) & (values <= hi)
        if get_family(family_id).integer_only:
            valid &= np.abs(values - np.round(values)) <= INTEGER_TOLERANCE
    values[~valid] = np.nan
    return ParsedSamples(values=values, valid=valid)
