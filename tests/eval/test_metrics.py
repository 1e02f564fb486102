"""W1 scoring (docs/benchmarks/structured.md): calibft.w1 / w1_batch against the formula computed
directly with NumPy and SciPy, and calibft.discrete_w1 against scipy.stats.wasserstein_distance."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import calibft
from calibft.distributions import frozen_law
from calibft.splits import splits
from calibft.targets.numeric import build_output_space


@lru_cache(maxsize=1)
def all_specs():
    """Every prompt of the full-grid splits (training, unseen parameters and OOD families)."""
    return [spec for specs in splits("full_grid").values() for spec in specs]


def spec_w1(samples, law) -> float:
    """docs/benchmarks/structured.md written out: sorted samples against the law's quantiles at
    (i − 0.5)/N, terms where both are finite, divided by N; NaN without samples."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    if n == 0:
        return math.nan
    q = law.ppf((np.arange(1, n + 1) - 0.5) / n)
    finite = np.isfinite(x) & np.isfinite(q)
    return float(np.abs(x[finite] - q[finite]).sum() / n)


def spec_scale(law) -> float:
    spread = float(law.ppf(0.95) - law.ppf(0.05))
    return spread if spread > 0 else math.nan


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


@st.composite
def spec_and_samples(draw: st.DrawFn):
    """A prompt spec and samples: draws from its law, arbitrary floats, or a mix."""
    spec = draw(st.sampled_from(all_specs()))
    law = frozen_law(spec.family, spec.params)
    n = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["law", "floats", "mixed"]))
    seed = draw(st.integers(0, 2**32 - 1))
    from_law = np.asarray(
        law.rvs(size=n, random_state=np.random.default_rng(seed)), dtype=np.float64
    )
    floats = np.asarray(
        draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=n, max_size=n)),
        dtype=np.float64,
    )
    samples = {
        "law": from_law,
        "floats": floats,
        "mixed": np.where(np.arange(n) % 2 == 0, from_law, floats),
    }[kind]
    return spec, samples


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=spec_and_samples(), normalized=st.booleans())
def test_w1_equals_spec_formula_and_scipy(case, normalized):
    spec, samples = case
    law = frozen_law(spec.family, spec.params)
    got = calibft.w1(samples, spec.family, spec.params, normalized=normalized)
    expected = spec_w1(samples, law)
    # For N samples against N quantiles, W1 of the two empirical laws is the sorted matching.
    n = samples.size
    quantiles = law.ppf((np.arange(n) + 0.5) / n)
    assert np.isfinite(quantiles).all()
    assert close(expected, stats.wasserstein_distance(samples, quantiles))
    if normalized:
        expected /= spec_scale(law)
    assert close(got, expected)
    # Samples are scored as a set: their order does not matter.
    shuffled = np.random.default_rng(0).permutation(samples)
    assert calibft.w1(shuffled, spec.family, spec.params, normalized=normalized) == got


# Laws written out by hand from docs/method.md §2 (independent of calibft's family registry).
HAND_LAWS = [
    ("gaussian", {"mu": 0.4, "sigma": 1.5}, stats.norm(loc=0.4, scale=1.5)),
    ("exponential", {"lambda": 2.0}, stats.expon(scale=0.5)),
    ("lognormal", {"mu": 0.5, "sigma": 0.8}, stats.lognorm(s=0.8, scale=math.exp(0.5))),
    ("inverse_gaussian", {"mu": 2.0, "lambda": 4.0}, stats.invgauss(0.5, scale=4.0)),
    ("poisson", {"lambda": 4.0}, stats.poisson(4.0)),
    ("binomial", {"n": 10, "p": 0.35}, stats.binom(10, 0.35)),
    ("cauchy", {"x0": 1.0, "gamma": 0.5}, stats.cauchy(loc=1.0, scale=0.5)),
]


@pytest.mark.parametrize("family,params,law", HAND_LAWS, ids=[h[0] for h in HAND_LAWS])
def test_w1_against_hand_built_laws(family, params, law):
    rng = np.random.default_rng(7)
    samples = law.rvs(size=500, random_state=rng) + rng.normal(0.0, 0.3, size=500)
    quantiles = law.ppf((np.arange(500) + 0.5) / 500)
    raw = stats.wasserstein_distance(samples, quantiles)
    assert close(calibft.w1(samples, family, params), raw)
    scale = law.ppf(0.95) - law.ppf(0.05)
    assert close(calibft.w1(samples, family, params, normalized=True), raw / scale)
    assert close(calibft.eval.metrics.w1_scale(family, params), scale)


def test_w1_hand_computed_value():
    # N = 2 against U(0, 1): quantiles 0.25 and 0.75; sorted samples (0, 1) are off by 0.25 each.
    assert calibft.w1([1.0, 0.0], "uniform", {"a": 0.0, "b": 1.0}) == pytest.approx(0.25, abs=1e-15)
    # Normalized: Q95 − Q05 = 0.9.
    assert calibft.w1(
        [1.0, 0.0], "uniform", {"a": 0.0, "b": 1.0}, normalized=True
    ) == pytest.approx(0.25 / 0.9, abs=1e-15)
    # Samples exactly at the quantiles score zero.
    law = stats.norm(loc=3.0, scale=2.0)
    exact = law.ppf((np.arange(40) + 0.5) / 40)
    assert calibft.w1(exact[::-1], "gaussian", {"mu": 3.0, "sigma": 2.0}) == pytest.approx(
        0.0, abs=1e-12
    )


def test_w1_skips_infinite_terms_but_counts_them():
    """docs/benchmarks/structured.md: the sum runs over terms where both are finite; the divisor
    stays N."""
    samples = np.array([np.inf, 0.3, -0.2, 1.0])
    law = stats.norm(0.0, 1.0)
    q = law.ppf((np.arange(4) + 0.5) / 4)
    x = np.sort(samples)
    expected = np.abs(x[:3] - q[:3]).sum() / 4
    assert close(calibft.w1(samples, "gaussian", {"mu": 0.0, "sigma": 1.0}), expected)


def test_w1_without_samples_is_missing():
    """docs/benchmarks/structured.md: undefined (reported as missing, NaN) when there is no valid
    sample."""
    assert math.isnan(calibft.w1([], "gaussian", {"mu": 0.0, "sigma": 1.0}))
    assert math.isnan(
        calibft.w1(np.zeros(0), "gaussian", {"mu": 0.0, "sigma": 1.0}, normalized=True)
    )


def test_normalized_w1_of_a_degenerate_law_is_missing():
    # Bernoulli(0.99): Q05 = Q95 = 1, so the scale is 0 and normalized W1 has no meaning.
    assert math.isnan(calibft.eval.metrics.w1_scale("bernoulli", {"p": 0.99}))
    assert math.isnan(calibft.w1([1.0, 1.0, 0.0], "bernoulli", {"p": 0.99}, normalized=True))
    assert calibft.w1([1.0, 1.0, 0.0], "bernoulli", {"p": 0.99}) == pytest.approx(1 / 3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases=st.lists(spec_and_samples(), min_size=0, max_size=8),
    empty=st.lists(st.booleans(), min_size=8, max_size=8),
    normalized=st.booleans(),
)
def test_w1_batch_equals_the_loop(cases, empty, normalized):
    samples = [np.zeros(0) if e else s for (_, s), e in zip(cases, empty)]
    specs = [spec for spec, _ in cases]
    batch = calibft.w1_batch(samples, specs, normalized=normalized)
    assert batch.dtype == np.float64 and batch.shape == (len(cases),)
    loop = [
        calibft.w1(s, spec.family, spec.params, normalized=normalized)
        for s, spec in zip(samples, specs)
    ]
    np.testing.assert_allclose(batch, loop, rtol=1e-12, atol=0)
    # Specs may also be given as (family, params) pairs, samples as plain lists.
    pairs = [(spec.family, spec.params) for spec in specs]
    again = calibft.w1_batch([list(s) for s in samples], pairs, normalized=normalized)
    np.testing.assert_array_equal(again, batch)


@pytest.mark.parametrize("family", sorted({spec.family for spec in all_specs()}))
def test_w1_batch_of_one_family_in_one_scipy_call_equals_the_loop(family):
    # Many parameter sets of one family share one batched SciPy law: every family's law must
    # build over parameter columns and give each row the quantiles of its own parameters.
    specs = [spec for spec in all_specs() if spec.family == family][:12]
    assert len(specs) > 1
    rng = np.random.default_rng(0)
    samples = np.stack(
        [
            np.asarray(
                frozen_law(s.family, s.params).rvs(size=64, random_state=rng), dtype=np.float64
            )
            for s in specs
        ]
    )
    for normalized in (False, True):
        batch = calibft.w1_batch(samples, specs, normalized=normalized)  # 2-D: one row per prompt
        loop = [
            calibft.w1(row, s.family, s.params, normalized=normalized)
            for row, s in zip(samples, specs)
        ]
        np.testing.assert_allclose(batch, loop, rtol=1e-12, atol=0)


def test_w1_rejects_nan_samples():
    with pytest.raises(ValueError, match="NaN"):
        calibft.w1([0.1, np.nan], "gaussian", {"mu": 0.0, "sigma": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        calibft.w1_batch([[0.1], [np.nan]], [("gaussian", {"mu": 0.0, "sigma": 1.0})] * 2)


def test_w1_rejects_bad_laws_and_shapes():
    with pytest.raises(ValueError, match="family"):
        calibft.w1([0.1], "no_such_family", {"mu": 0.0})
    with pytest.raises(ValueError, match="sigma"):
        calibft.w1([0.1], "gaussian", {"mu": 0.0, "sigma": -1.0})
    with pytest.raises(ValueError, match="spec"):
        calibft.w1_batch([[0.1], [0.2]], [("gaussian", {"mu": 0.0, "sigma": 1.0})])
    with pytest.raises(ValueError, match="one spec per sample set"):
        calibft.w1_batch(np.zeros((3, 4)), [("gaussian", {"mu": 0.0, "sigma": 1.0})] * 2)


# ---- discrete W1 -------------------------------------------------------------------------------


@st.composite
def support_and_masses(draw: st.DrawFn):
    n = draw(st.integers(1, 60))
    x = np.sort(np.asarray(draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n))))
    weights = st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n).filter(lambda w: sum(w) > 1e-3)
    p = np.asarray(draw(weights))
    q = np.asarray(draw(weights))
    return x, p, q


@settings(max_examples=200, deadline=None)
@given(case=support_and_masses())
def test_discrete_w1_equals_scipy(case):
    x, p, q = case
    expected = stats.wasserstein_distance(x, x, p, q)
    # Masses are normalized like SciPy's weights, so the raw weights give the same answer.
    assert close(calibft.discrete_w1(x, p, q), expected)
    assert close(calibft.discrete_w1(x, p / p.sum(), q / q.sum()), expected)
    assert close(calibft.discrete_w1(x, q, p), expected)
    assert calibft.discrete_w1(x, p, p) == pytest.approx(0.0, abs=1e-9 * max(1.0, np.ptp(x)))


def test_discrete_w1_on_an_output_space():
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=2, max_bins=300)
    x, p = space.numeric, space.probs
    shifted = np.roll(p, 5)
    assert close(calibft.discrete_w1(x, p, shifted), stats.wasserstein_distance(x, x, p, shifted))
    # A point mass moved from the first value to the last travels the whole range.
    a, b = np.zeros(len(x)), np.zeros(len(x))
    a[0], b[-1] = 1.0, 1.0
    assert calibft.discrete_w1(x, a, b) == pytest.approx(x[-1] - x[0], rel=1e-12)


def test_discrete_w1_rejects_bad_inputs():
    x = np.array([0.0, 1.0, 2.0])
    p = np.array([0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"^p must"):
        calibft.discrete_w1(x, [0.2, np.nan, 0.5], p)
    with pytest.raises(ValueError, match=r"^q must"):
        calibft.discrete_w1(x, p, [0.5, -0.5, 1.0])
    with pytest.raises(ValueError, match=r"^q must"):
        calibft.discrete_w1(x, p, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="numeric_values"):
        calibft.discrete_w1([0.0, 1.0, np.inf], p, p)
    with pytest.raises(ValueError, match="numeric_values"):
        calibft.discrete_w1([0.0, np.nan, 2.0], p, p)
    with pytest.raises(ValueError, match="sorted"):
        calibft.discrete_w1([0.0, 2.0, 1.0], p, p)
    with pytest.raises(ValueError, match="length"):
        calibft.discrete_w1(x, p[:2], p)
    with pytest.raises(ValueError, match=r"^p must"):
        calibft.discrete_w1([], [], [])
