"""The structured benchmark's goodness-of-fit tests against SciPy: KS (scipy.stats.kstest), χ²
(scipy.stats.chisquare on the pooled cells), the pooling rule, which samples enter, pass rate."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from calibft.distributions import frozen_law, get_family
from calibft.eval.benchmarks import structured
from calibft.eval.benchmarks.structured.fit import (
    ALPHA,
    FIELDS,
    MIN_EXPECTED,
    MIN_SAMPLES,
    chi2_cells,
    chi2_test,
    goodness_of_fit,
    ks_test,
    pass_summary,
)
from calibft.splits import HELD_OUT_SPLITS, splits

SPECS = [s for name in HELD_OUT_SPLITS for s in splits("paper_selected")[name]]
CONTINUOUS = [s for s in SPECS if not get_family(s.family).integer_only]
INTEGER = [s for s in SPECS if get_family(s.family).integer_only]


def spec_of(family):
    return next(s for s in SPECS if s.family == family)


@pytest.mark.parametrize("family", ["gaussian", "weibull", "truncnorm", "cauchy", "pareto"])
@pytest.mark.parametrize("n", [MIN_SAMPLES, 100, 1000])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_ks_equals_scipy_kstest(family, n, shift) -> None:
    spec = spec_of(family)
    law = frozen_law(spec.family, spec.params)
    rng = np.random.default_rng(n)
    # shifted by a share of the interquartile range (Cauchy and Pareto may have no std)
    x = law.rvs(size=n, random_state=rng) + shift * (law.ppf(0.75) - law.ppf(0.25))
    x = np.round(x, 2)  # ties, as rounded answers have them
    record = goodness_of_fit(x, spec.family, spec.params)
    expected = stats.kstest(x, law.cdf)
    assert record["ks_statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert record["ks_pvalue"] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    assert record["chi2_statistic"] is record["chi2_pvalue"] is record["chi2_df"] is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=60),
    st.sampled_from(CONTINUOUS),
)
def test_ks_equals_scipy_on_any_values(values, spec) -> None:
    law = frozen_law(spec.family, spec.params)
    statistic, pvalue = ks_test(values, law)
    expected = stats.kstest(values, law.cdf)
    assert statistic == pytest.approx(expected.statistic, rel=1e-12, abs=1e-15)
    assert pvalue == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def counts_in(cells_starts, values):
    """Observed counts per cell, counted by the cells' definition (not by searchsorted)."""
    bounds = [-math.inf, *cells_starts, math.inf]
    return np.array([sum(a <= v < b for v in values) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("spec", INTEGER, ids=lambda s: f"{s.family}{s.params}")
@pytest.mark.parametrize("n", [100, 1000])
def test_chi2_equals_scipy_chisquare(spec, n) -> None:
    law = frozen_law(spec.family, spec.params)
    x = law.rvs(size=n, random_state=np.random.default_rng(7))
    starts, expected = chi2_cells(law, n)
    result = chi2_test(x, law)
    if expected.size < 2:  # a law with (nearly) all its mass on one value has nothing to test
        assert result is None
        return
    reference = stats.chisquare(counts_in(starts, x), expected)  # df = cells - 1 (ddof 0)
    statistic, pvalue, df = result
    assert df == expected.size - 1
    assert statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert pvalue == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-300)
    record = goodness_of_fit(x, spec.family, spec.params)
    assert (record["chi2_statistic"], record["chi2_pvalue"], record["chi2_df"]) == result
    assert record["ks_statistic"] is record["ks_pvalue"] is None


def test_chi2_rejects_a_wrong_law_and_keeps_the_right_one() -> None:
    law = frozen_law("poisson", {"lambda": 4.0})
    right = law.rvs(size=1000, random_state=np.random.default_rng(0))
    wrong = stats.poisson(4.6).rvs(size=1000, random_state=np.random.default_rng(0))
    assert chi2_test(right, law)[1] >= ALPHA > chi2_test(wrong, law)[1]


def test_pooling_of_poisson_tails_by_hand() -> None:
    n, pmf = 1000, stats.poisson(4.0).pmf
    starts, expected = chi2_cells(frozen_law("poisson", {"lambda": 4.0}), n)
    # 0..9 each expect >= 5; {10} expects 5.3 and closes; {11, 12, ...} expect 2.8 in all and
    # join it: the last cell is [10, inf).
    assert n * pmf(10) >= MIN_EXPECTED > n * stats.poisson(4.0).sf(10)
    np.testing.assert_array_equal(starts, np.arange(1, 11))
    np.testing.assert_allclose(expected, [*(n * pmf(np.arange(10))), n * stats.poisson.sf(9, 4.0)])


@pytest.mark.parametrize(
    "family, params", [("skellam", {"mu1": 1.0, "mu2": 8.0}), ("poisson", {"lambda": 50.0})]
)
@pytest.mark.parametrize("n", [100, 1000])
def test_lowest_cell_is_the_lower_tail_up_to_its_fifth_expected(family, params, n) -> None:
    law = frozen_law(family, params)
    starts, expected = chi2_cells(law, n)
    # The walk closes its first cell at the smallest k with n F(k) >= 5: the quantile at 5/n.
    assert starts[0] == law.ppf(MIN_EXPECTED / n) + 1
    assert expected[0] == pytest.approx(n * law.cdf(starts[0] - 1))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(INTEGER), st.integers(MIN_SAMPLES, 3000))
def test_pooled_cells_follow_the_rule(spec, n) -> None:
    law = frozen_law(spec.family, spec.params)
    starts, expected = chi2_cells(law, n)
    assert expected.sum() == pytest.approx(n, rel=1e-9)  # the cells cover the whole support
    assert (expected >= MIN_EXPECTED * (1 - 1e-12)).all()
    assert (np.diff(starts) > 0).all() and (starts == np.rint(starts)).all()
    lo, hi = law.support()
    assert (starts > lo).all() and (starts <= hi).all()
    bounds = [-math.inf, *starts, math.inf]
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        mass = law.cdf(b - 1) - law.cdf(a - 1) if b < math.inf else law.sf(a - 1)
        assert n * mass == pytest.approx(expected[j], rel=1e-6, abs=1e-9)
        if j < len(expected) - 1:
            # closed as soon as it reached MIN_EXPECTED: without its last value it fell short
            assert n * (mass - law.pmf(b - 1)) < MIN_EXPECTED
    if len(expected) > 1:
        # the last closed cell ends where the rest of the support expects less than MIN_EXPECTED
        # (otherwise the walk would have closed another cell), so it holds some value above that
        ks = np.arange(bounds[-2], bounds[-2] + 10_000)
        reached = n * (law.cdf(ks) - law.cdf(bounds[-2] - 1)) >= MIN_EXPECTED
        assert reached.any() and n * law.sf(ks[reached.argmax()]) < MIN_EXPECTED


def test_degenerate_law_and_few_samples_have_no_test() -> None:
    assert goodness_of_fit(np.ones(500), "bernoulli", {"p": 1.0}) == dict.fromkeys(FIELDS)
    law = frozen_law("weibull", spec_of("weibull").params)
    x = law.rvs(size=MIN_SAMPLES, random_state=np.random.default_rng(1))
    assert goodness_of_fit(x[:-1], "weibull", spec_of("weibull").params) == dict.fromkeys(FIELDS)
    assert goodness_of_fit(x, "weibull", spec_of("weibull").params)["ks_pvalue"] is not None
    assert goodness_of_fit([], "poisson", {"lambda": 4.0}) == dict.fromkeys(FIELDS)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError, match="valid"):
        goodness_of_fit([1.0] * 30 + [math.nan], "gaussian", {"mu": 0.0, "sigma": 1.0})
    with pytest.raises(ValueError, match="integral"):
        goodness_of_fit([1.0] * 30 + [2.5], "poisson", {"lambda": 4.0})


@pytest.mark.parametrize("family", ["poisson", "weibull"])
def test_records_test_only_the_valid_answers(family) -> None:
    spec = spec_of(family)
    law = frozen_law(spec.family, spec.params)
    draws = law.rvs(size=200, random_state=np.random.default_rng(3))
    valid = [str(int(v)) if family == "poisson" else f"{v:.5f}" for v in draws]
    # unparseable, out of the support, infinite, two numbers; non-integral for Poisson
    invalid = ["abc", "-1", "1e999", "3 4"] * 10 + (["2.5"] * 10 if family == "poisson" else [])
    record = structured.sample_metrics(spec, valid[:100] + invalid + valid[100:])
    values = np.array([float(v) for v in valid])
    if family == "poisson":
        starts, expected = chi2_cells(law, values.size)
        reference = stats.chisquare(counts_in(starts, values), expected)
        assert record["chi2_statistic"] == pytest.approx(reference.statistic, rel=1e-12)
        assert record["chi2_df"] == expected.size - 1
    else:
        reference = stats.kstest(values, law.cdf)
        assert record["ks_statistic"] == pytest.approx(reference.statistic, rel=1e-12)
        assert record["ks_pvalue"] == pytest.approx(reference.pvalue, rel=1e-9)


def test_pass_rate_counts_tested_prompts() -> None:
    records = [
        {"ks_pvalue": 0.5, "chi2_pvalue": None},
        {"ks_pvalue": 0.005, "chi2_pvalue": None},
        {"ks_pvalue": None, "chi2_pvalue": ALPHA},  # p = alpha passes
        {"ks_pvalue": None, "chi2_pvalue": None},  # untested: not in the rate
    ]
    assert pass_summary(records) == {"gof_pass_rate": 2 / 3, "gof_tested": 3}
    assert pass_summary(records[3:]) == {"gof_pass_rate": None, "gof_tested": 0}


def test_summary_carries_the_pass_rate_per_split() -> None:
    records = []
    for i, spec in enumerate(s for s in SPECS if s.family in ("poisson", "weibull", "uniform")):
        law = frozen_law(spec.family, spec.params)
        x = law.rvs(size=100, random_state=np.random.default_rng(i))
        texts = [str(int(v)) if spec.family == "poisson" else str(v) for v in x]
        others = dict.fromkeys(field for field, _ in structured.AGGREGATES.values())
        record = {**others, **structured.sample_metrics(spec, texts)}
        records.append({**record, "section": spec.split, "group": spec.family})
    summary = structured.summarize(records, None)
    for section, figures in summary.items():
        expected = pass_summary([r for r in records if r["section"] == section])
        assert figures["gof_pass_rate"] == expected["gof_pass_rate"]
        assert figures["gof_tested"] == expected["gof_tested"] > 0


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 20), st.integers(0, 4), st.integers(MIN_SAMPLES, 1000))
def test_rounding_moves_ks_by_at_most_half_a_cell_of_mass(sigma, decimals, n) -> None:
    # docs/benchmarks/structured.md §10: answers rounded to d decimals change D by at most
    # sup_x F(x + h/2) - F(x) = Phi(h / (2 sigma)) - 1/2 for a Gaussian, h = 10^-d.
    law = stats.norm(0.0, sigma)
    y = law.rvs(size=n, random_state=np.random.default_rng(n))
    bound = stats.norm.cdf(10.0**-decimals / (2 * sigma)) - 0.5
    assert abs(ks_test(np.round(y, decimals), law)[0] - ks_test(y, law)[0]) <= bound + 1e-12
