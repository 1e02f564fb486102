"""Output spaces: each prompt's law discretized into canonical strings with masses
(docs/method.md §4), or a weighted list of arbitrary strings (`space_from_values`,
docs/targets.md).

SciPy supplies the law's quantiles, CDF and PMF (vectorized, one call per prompt); the grid,
formatting, masses and merging happen in the Rust core.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from calibft import _core
from calibft.distributions import (
    frozen_law,
    is_integer_family,
    law_ppf,
    prompt_text,
    quantile_levels,
    support,
    validate_params,
)

MAX_DECIMALS: int = _core.MAX_DECIMALS
"""Most decimals a continuous output space can have (the Rust grid's limit)."""
MAX_BINS_LIMIT: int = _core.MAX_BINS_LIMIT
"""Largest `max_bins` an output space can have."""

Q_LO, Q_HI = quantile_levels()  # grid_defaults.quantile_low / quantile_high of families.json
# Fallback interval when a law's quantile bounds are unusable (docs/method.md §4, continuous
# step 1).
FALLBACK_BOUNDS = (-10.0, 10.0)


@dataclass(frozen=True)
class OutputSpace:
    """A prompt's target: canonical strings with their masses. Numeric spaces discretize a law
    (`family`, `params`; values in numeric order); string spaces (`family` None) are weighted
    lists of arbitrary answers, in the order given, with no numeric view and no bounds.

    `prompt` is the prompt the answers complete (None for a string space built without one):
    answers are tokenized after its chat prefix."""

    family: str | None
    params: Mapping[str, float]
    core: _core.OutputSpace = field(repr=False)
    prompt: str | None = None

    @cached_property
    def values(self) -> list[str]:
        return self.core.values

    @property
    def is_numeric(self) -> bool:
        return self.family is not None

    @cached_property
    def numeric(self) -> np.ndarray:
        """The values as numbers (numeric spaces only)."""
        numeric = self.core.numeric
        if numeric is None:
            raise ValueError("this output space holds arbitrary strings: it has no numeric values")
        return numeric

    @cached_property
    def probs(self) -> np.ndarray:
        return self.core.probs

    @property
    def lower(self) -> float | None:
        return self.core.lower

    @property
    def upper(self) -> float | None:
        return self.core.upper

    @property
    def decimals(self) -> int | None:
        return self.core.decimals

    @property
    def integer(self) -> bool:
        return self.is_numeric and self.core.decimals is None

    def __len__(self) -> int:
        return len(self.core)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def build_output_space(
    family: str, params: Mapping[str, float], *, decimals: int = 5, max_bins: int = 1001
) -> OutputSpace:
    """Discretize `family(params)` into at most `max_bins` canonical strings (docs/method.md §4)."""
    decimals = _check_int("decimals", decimals, 0, MAX_DECIMALS)
    max_bins = _check_int("max_bins", max_bins, 2, MAX_BINS_LIMIT)
    params = validate_params(family, params)
    law = frozen_law(family, params)
    lo_support, hi_support = support(family, params)
    if is_integer_family(family):
        lower = lo_support if math.isfinite(lo_support) else math.floor(float(law_ppf(law, Q_LO)))
        upper = hi_support if math.isfinite(hi_support) else math.ceil(float(law_ppf(law, Q_HI)))
        values = _core.integer_values(float(lower), float(upper), max_bins)
        pmf = np.asarray(law.pmf(values), dtype=np.float64)
        tail = 0.0 if math.isfinite(hi_support) else float(1.0 - law.cdf(values[-1]))
        core = _core.integer_space(values, pmf, tail)
    else:
        q_lo, q_hi = law.ppf([Q_LO, Q_HI])
        lower, upper = max(float(q_lo), lo_support), min(float(q_hi), hi_support)
        if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
            lower, upper = FALLBACK_BOUNDS
        edges = _core.continuous_edges(lower, upper, decimals, max_bins)
        cdf = np.asarray(law.cdf(edges), dtype=np.float64)
        core = _core.continuous_space(lower, upper, decimals, max_bins, cdf)
    return OutputSpace(family, params, core, prompt_text(family, params))


def build_output_spaces(
    specs: Iterable[Any], *, decimals: int = 5, max_bins: int = 1001
) -> list[OutputSpace]:
    """One space per prompt spec (anything with `.family` and `.params`) or `(family, params)`
    pair."""
    return [
        build_output_space(*family_params(s), decimals=decimals, max_bins=max_bins) for s in specs
    ]


def space_from_values(
    values: Sequence[str], masses: Sequence[float], prompt: str | None = None
) -> OutputSpace:
    """A space of arbitrary strings with the given masses (normalized), completing `prompt`.

    The strings are never parsed as numbers; they must be non-empty and distinct, the masses
    finite, non-negative and not all zero (ValueError naming the field otherwise)."""
    core = _core.space_from_parts(list(values), np.asarray(masses, dtype=np.float64))
    return OutputSpace(None, {}, core, prompt)


def family_params(spec: Any) -> tuple[str, Mapping[str, float]]:
    """`(family, params)` of a prompt spec (anything with `.family` and `.params`) or a pair."""
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec.family, spec.params
