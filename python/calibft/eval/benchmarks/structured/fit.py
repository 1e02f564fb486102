"""Goodness of fit of one prompt's valid samples to its law (docs/benchmarks/structured.md §10).

Beside W1, a test with a p-value, as in the audit of Zhao et al. ("Bad Dice"): the one-sample
Kolmogorov-Smirnov test against the law's exact SciPy CDF for continuous families, Pearson's χ²
test over the support, adjacent values pooled until every cell expects at least 5, for integer
families. Pure functions of the valid values: no randomness, so every run gives the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibft.distributions import frozen_law, get_family, law_ppf
from calibft.eval.benchmarks.structured.answers import INTEGER_TOLERANCE

ALPHA = 0.01
"""Significance level of the pass rate: a prompt passes when its p-value is at least this."""
MIN_SAMPLES = 20
"""Fewest valid samples a prompt is tested on; with fewer its fields are null (no p-value), and
it is left out of the pass rate rather than counted as a pass it could hardly fail."""
MIN_EXPECTED = 5.0
"""Least expected count of a χ² cell (the usual condition for the χ² approximation)."""
FIELDS = ("ks_statistic", "ks_pvalue", "chi2_statistic", "chi2_pvalue", "chi2_df")
"""The record fields `goodness_of_fit` fills; those of the other test stay null."""


def ks_test(values: Any, law: Any) -> tuple[float, float]:
    """Two-sided one-sample KS statistic D = sup |F_N − F| of `values` against the frozen law's
    CDF, and its exact p-value (`scipy.stats.kstwo`, the null distribution for a continuous F)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    cdf = law.cdf(x)
    # The ECDF jumps at each sorted value: from (i − 1)/N just below it to i/N at it.
    steps = np.arange(1, n + 1) / n
    statistic = float(max((steps - cdf).max(), (cdf - (steps - 1 / n)).max()))
    from scipy import stats  # loaded already: `law` is a SciPy law

    return statistic, float(np.clip(stats.kstwo.sf(statistic, n), 0.0, 1.0))


def chi2_cells(law: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The χ² cells of an integer law for `n` samples: (starts, expected).

    The rule: walk the support upwards, adding each value's expected count n·P(X = k) to the open
    cell and closing the cell once it expects at least MIN_EXPECTED; a remainder short of that at
    the top joins the last closed cell. The lowest cell is open below and the highest open above,
    so the cells cover the whole support (a law unbounded above or below included) and the
    expected counts sum to n. `starts` holds the first value of every cell but the lowest: cell j
    is the integers in [starts[j − 1], starts[j]), with starts[−1] = −∞ and starts[m − 1] = +∞.
    """
    lo, hi = (float(v) for v in law.support())
    # A finite window that yields the same cells: below it the law has less than 1/n of mass, so
    # the walk cannot close a cell there; above it, too little for more than the cell it closes.
    tail = 1.0 / n
    first = lo if math.isfinite(lo) else float(law_ppf(law, tail)) - 1.0
    last = hi if math.isfinite(hi) else float(law_ppf(law, 1.0 - tail))
    values = np.arange(first, last + 1.0)
    mass = np.asarray(law.pmf(values), dtype=np.float64)
    mass[0] = law.cdf(first)  # everything at or below the window's first value
    if values.size > 1:
        mass[-1] = law.sf(last - 1.0)  # everything at or above its last value
    starts: list[float] = []
    expected: list[float] = []
    open_start, count = 0, 0.0
    for k, e in enumerate(n * mass):
        count += e
        if count >= MIN_EXPECTED:
            starts.append(values[open_start])
            expected.append(count)
            open_start, count = k + 1, 0.0
    if not expected:  # n below MIN_EXPECTED: one cell holding everything
        return np.zeros(0), np.array([count])
    expected[-1] += count
    return np.array(starts[1:]), np.array(expected)


def chi2_test(values: Any, law: Any) -> tuple[float, float, int] | None:
    """Pearson's χ² of integer `values` over `chi2_cells` (statistic, p-value, df = cells − 1:
    the law is given, nothing is fitted); None when the law leaves a single cell."""
    x = np.asarray(values, dtype=np.float64)
    integers = np.rint(x)
    if (np.abs(x - integers) > INTEGER_TOLERANCE).any():
        raise ValueError("a χ² test over an integer law needs integral values")
    starts, expected = chi2_cells(law, x.size)
    if expected.size < 2:
        return None
    observed = np.bincount(np.searchsorted(starts, integers, side="right"), minlength=expected.size)
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = expected.size - 1
    from scipy import stats  # loaded already: `law` is a SciPy law

    return statistic, float(stats.chi2.sf(statistic, df)), df


def goodness_of_fit(values: Any, family: str, params: Mapping[str, float]) -> dict[str, Any]:
    """The FIELDS of one prompt from its valid values: KS for a continuous family, χ² for an
    integer one; every field null with fewer than MIN_SAMPLES values or a single χ² cell."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("values must be finite: pass only the valid (parsed) values")
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    if x.size < MIN_SAMPLES:
        return record
    law = frozen_law(family, params)
    if not get_family(family).integer_only:
        record["ks_statistic"], record["ks_pvalue"] = ks_test(x, law)
    elif (result := chi2_test(x, law)) is not None:
        record["chi2_statistic"], record["chi2_pvalue"], record["chi2_df"] = result
    return record


def pvalue(record: Mapping[str, Any]) -> float | None:
    """The p-value of a prompt's record, whichever test it had (None: not tested)."""
    ks = record.get("ks_pvalue")
    return ks if ks is not None else record.get("chi2_pvalue")


def pass_summary(records: Sequence[Mapping[str, Any]], alpha: float = ALPHA) -> dict[str, Any]:
    """`gof_tested`: the prompts with a p-value; `gof_pass_rate`: the fraction of them whose
    p-value is at least `alpha` (null when none was tested). Prompts count alike, whatever their
    family: the rate is the share of prompts whose law the test did not reject."""
    pvalues = [p for p in map(pvalue, records) if p is not None]
    rate = sum(p >= alpha for p in pvalues) / len(pvalues) if pvalues else None
    return {"gof_pass_rate": rate, "gof_tested": len(pvalues)}
