"""Validity rules of a generated sample (SPEC section 8).

A generation is valid if, after removing any reasoning trace, the stripped text fully matches a
decimal or scientific-notation literal, is finite, lies within the family's support and, for
integer families, is integral. Parsing never raises on malformed text: such a generation is simply
invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from calibft.distributions import get_family, support

# re.ASCII: `\d` would otherwise also match e.g. Arabic-Indic digits, which float() accepts.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)

# A closed reasoning block, an unterminated one (generation stopped while still thinking: there
# is no answer after it), and a bare closing tag (some templates open the block in the prompt).
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*\Z", re.DOTALL)
_THINK_CLOSE = re.compile(r"\A.*</think>", re.DOTALL)

# GPT-OSS (harmony): the answer is whatever follows the last final-channel header; an analysis
# channel with no final channel after it holds no answer. The second spelling is the same text
# decoded with special tokens skipped.
_FINAL_HEADER = re.compile(r"\A.*(?:<\|channel\|>final<\|message\|>|assistantfinal)", re.DOTALL)
_ANALYSIS_ONLY = re.compile(r"(?:<\|channel\|>analysis|\Aanalysis).*\Z", re.DOTALL)
_HARMONY_TRAILER = re.compile(r"(?:<\|return\|>|<\|end\|>|<\|call\|>)\s*\Z")

INTEGER_TOLERANCE = 1e-9


def strip_reasoning(text: str) -> str:
    """The answer part of a completion: reasoning traces (closed or not) removed."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_OPEN.sub("", text)
    text = _THINK_CLOSE.sub("", text)
    final = _FINAL_HEADER.match(text)
    if final is not None:
        text = text[final.end() :]
    else:
        text = _ANALYSIS_ONLY.sub("", text)
    return _HARMONY_TRAILER.sub("", text)


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
    """Apply SPEC section 8's validity rules to every generation of one prompt."""
    lo, hi = support(family_id, params)
    values = np.array([parse_number(text) for text in texts], dtype=np.float64)
    with np.errstate(invalid="ignore"):  # nan compares False, so invalid stays invalid
        valid = (values >= lo) & (values <= hi)
        if get_family(family_id).integer_only:
            valid &= np.abs(values - np.round(values)) <= INTEGER_TOLERANCE
    values[~valid] = np.nan
    return ParsedSamples(values=values, valid=valid)
