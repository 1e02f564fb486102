"""Output spaces (docs/method.md §4): invariants over random families and parameters, equality with
the pure NumPy/SciPy reference in tests/reference.py, hand-checked spaces and bad input."""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import reference_space
from scipy import stats

from calibft import _core
from calibft.distributions import families, get_family, support, validate_params
from calibft.splits import splits
from calibft.targets.numeric import build_output_space, build_output_spaces

FAMILY_IDS = [f.id for f in families()]
MAX_BINS = [2, 7, 101, 1001, 16384]


@lru_cache(maxsize=1)
def grid_params() -> dict[str, list[dict[str, float]]]:
    """Every family's parameter sets from all split grids (both selections)."""
    out: dict[str, list[dict[str, float]]] = {f: [] for f in FAMILY_IDS}
    for selection in ("full_grid", "paper_selected"):
        for specs in splits(selection).values():
            for spec in specs:
                if spec.params not in out[spec.family]:
                    out[spec.family].append(spec.params)
    return out


def test_every_family_has_grid_params():
    assert len(FAMILY_IDS) == 30
    assert all(grid_params()[f] for f in FAMILY_IDS)


@st.composite
def family_params(draw: st.DrawFn) -> tuple[str, dict[str, float]]:
    """A family and valid parameters: a grid point, often perturbed."""
    family = draw(st.sampled_from(FAMILY_IDS))
    params = dict(draw(st.sampled_from(grid_params()[family])))
    if draw(st.booleans()):
        for name, value in params.items():
            if value == 0:
                params[name] = draw(st.floats(-2.0, 2.0))
            else:
                params[name] = value * draw(st.floats(0.6, 1.6))
        try:
            params = validate_params(family, params)
        except ValueError:
            # Count parameters (n, r, M, K, N) must stay integers.
            params = {k: float(round(v)) for k, v in params.items()}
            try:
                params = validate_params(family, params)
            except ValueError:
                assume(False)
    return family, params


def lattice_exceeds_float64(family: str, params: dict[str, float], decimals: int) -> bool:
    """Whether the decimal lattice of a continuous space has integers beyond float64's exact
    range: the core refuses such spaces (an error naming `decimals`) instead of mis-gridding."""
    from calibft.distributions import frozen_law

    if get_family(family).integer_only:
        return False
    law = frozen_law(family, params)
    lo_s, hi_s = support(family, params)
    lower, upper = max(float(law.ppf(0.001)), lo_s), min(float(law.ppf(0.999)), hi_s)
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        return False
    step = 10.0**-decimals
    return max(abs(lower / step), abs(upper / step)) > 9.0e15


def check_invariants(space, family: str, decimals: int, max_bins: int) -> None:
    probs = space.probs
    assert probs.dtype == np.float64
    assert np.all(probs >= 0)
    assert abs(probs.sum() - 1.0) < 1e-12
    assert 1 <= len(space.values) == len(probs) == len(space) <= max_bins
    assert len(set(space.values)) == len(space.values)
    numeric = np.array([float(v) for v in space.values])
    np.testing.assert_array_equal(space.numeric, numeric)
    assert np.all(np.diff(numeric) > 0)
    integer = get_family(family).integer_only
    assert space.integer == integer
    if integer:
        assert space.decimals is None
        assert all(str(int(v)) == v for v in space.values)
        assert (space.lower, space.upper) == (numeric[0], numeric[-1])
    else:
        assert space.decimals == decimals
        pattern = re.compile(r"-?\d+" + (rf"\.\d{{{decimals}}}" if decimals else ""))
        assert all(pattern.fullmatch(v) for v in space.values)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fp=family_params(),
    decimals=st.integers(0, 6),
    max_bins=st.sampled_from(MAX_BINS),
)
def test_spaces_match_reference(fp, decimals, max_bins):
    family, params = fp
    try:
        ref = reference_space(family, params, decimals, max_bins)
    except ValueError:
        ref = None  # all masses zero: docs/method.md §4 makes this an error
    except (RuntimeError, TypeError, OverflowError):
        # SciPy itself fails (e.g. Skellam's PPF loop) or the lattice leaves int64: no ground truth.
        assume(False)
    if lattice_exceeds_float64(family, params, decimals):
        with pytest.raises(ValueError, match="decimals"):
            build_output_space(family, params, decimals=decimals, max_bins=max_bins)
        return
    if ref is None:
        with pytest.raises(ValueError):
            build_output_space(family, params, decimals=decimals, max_bins=max_bins)
        return
    space = build_output_space(family, params, decimals=decimals, max_bins=max_bins)
    check_invariants(space, family, decimals, max_bins)
    values, probs = ref
    assert space.values == values
    np.testing.assert_allclose(space.probs, probs, rtol=0, atol=1e-12)
    assert space.family == family and dict(space.params) == params


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_every_family_at_paper_settings(family):
    """One grid point per family at both paper sizes (d = 5; 1001 and 16384 bins)."""
    params = grid_params()[family][len(grid_params()[family]) // 2]
    for max_bins in (1001, 16384):
        space = build_output_space(family, params, decimals=5, max_bins=max_bins)
        check_invariants(space, family, 5, max_bins)
        values, probs = reference_space(family, params, 5, max_bins)
        assert space.values == values
        np.testing.assert_allclose(space.probs, probs, rtol=0, atol=1e-12)


def test_defaults_are_the_paper_soft_target_settings():
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0})
    assert space.decimals == 5 and len(space) == 1001
    assert space.values[0] == "-3.09023" and space.values[-1] == "3.09023"


# ------------------------------------------------------------------------------------------
# Hand-checked spaces


def test_uniform_unit_interval_one_decimal():
    # Bounds are the 0.1% / 99.9% quantiles: [0.001, 0.999] holds the lattice points 0.1..0.9,
    # so the edge bins [0.001, 0.15] and [0.85, 0.999] plus their tails carry 0.15 each.
    space = build_output_space("uniform", {"a": 0, "b": 1}, decimals=1)
    assert space.values == [f"0.{i}" for i in range(1, 10)]
    np.testing.assert_allclose(space.probs, [0.15] + [0.1] * 7 + [0.15], rtol=0, atol=1e-12)
    assert (space.lower, space.upper) == (0.001, 0.999)


def test_uniform_wide_interval_zero_decimals_has_half_edge_bins():
    # [a, b] = [-0.5, 10.5]: quantile bounds -0.489 and 10.489 hold the integers 0..10; the edge
    # bins are [-0.489, 0.5] + tail = 1/11 and the inner bins 1/11 each.
    space = build_output_space("uniform", {"a": -0.5, "b": 10.5}, decimals=0)
    assert space.values == [str(i) for i in range(11)]
    np.testing.assert_allclose(space.probs, np.full(11, 1 / 11), rtol=0, atol=1e-12)


def test_bernoulli():
    space = build_output_space("bernoulli", {"p": 0.3})
    assert space.values == ["0", "1"]
    np.testing.assert_allclose(space.probs, [0.7, 0.3], rtol=0, atol=1e-15)
    assert space.integer and space.decimals is None


def test_poisson_upper_tail_goes_to_last_value():
    lam = 2.0
    pmf = [math.exp(-lam) * lam**k / math.factorial(k) for k in range(20)]
    # ppf(0.999) of Poisson(2) is 8: values 0..8, the last one carrying P(X >= 8).
    space = build_output_space("poisson", {"lambda": lam})
    assert space.values == [str(k) for k in range(9)]
    np.testing.assert_allclose(space.probs, pmf[:8] + [1 - sum(pmf[:8])], rtol=0, atol=1e-12)
    # Truncated to max_bins = 4: values 0..3, P(X >= 3) on "3".
    space = build_output_space("poisson", {"lambda": lam}, max_bins=4)
    assert space.values == ["0", "1", "2", "3"]
    np.testing.assert_allclose(space.probs, pmf[:3] + [1 - sum(pmf[:3])], rtol=0, atol=1e-12)


def test_bounded_integer_family_uses_whole_support_without_tail():
    space = build_output_space("binomial", {"n": 4, "p": 0.5}, max_bins=3)
    # 0..4 truncated to 0..2; no tail is added (finite support), then renormalized.
    assert space.values == ["0", "1", "2"]
    np.testing.assert_allclose(space.probs, np.array([1, 4, 6]) / 11, rtol=0, atol=1e-15)


def test_geometric_starts_at_one():
    space = build_output_space("geometric", {"p": 0.5}, max_bins=3)
    assert space.values == ["1", "2", "3"]
    np.testing.assert_allclose(space.probs, [0.5, 0.25, 0.25], rtol=0, atol=1e-15)


def test_skellam_has_negative_integers():
    space = build_output_space("skellam", {"mu1": 1.0, "mu2": 3.0})
    law = stats.skellam(1.0, 3.0)
    lo, hi = math.floor(law.ppf(0.001)), math.ceil(law.ppf(0.999))
    assert space.values == [str(k) for k in range(lo, hi + 1)]
    assert lo < 0 and space.values[0].startswith("-")


def test_subsampling_keeps_both_endpoints():
    # [0.01, 9.99] at 2 decimals has 999 lattice points; 7 bins keep indices
    # floor(linspace(0, 998, 7)) = 0, 166, 332, 499, 665, 831, 998.
    space = build_output_space("uniform", {"a": 0, "b": 10}, decimals=2, max_bins=7)
    assert space.values == ["0.01", "1.67", "3.33", "5.00", "6.66", "8.32", "9.99"]
    edges = np.array([0.84, 2.5, 4.165, 5.83, 7.49, 9.155]) / 10
    expected = np.diff(np.concatenate([[0.0], edges, [1.0]]))
    np.testing.assert_allclose(space.probs, expected, rtol=0, atol=1e-12)


def test_two_bins_are_the_two_endpoints():
    space = build_output_space("gaussian", {"mu": 0, "sigma": 1}, decimals=3, max_bins=2)
    assert space.values == ["-3.090", "3.090"]
    np.testing.assert_allclose(space.probs, [0.5, 0.5], rtol=0, atol=1e-12)


def test_empty_lattice_gives_the_rounded_midpoint():
    # [0.2691, 0.3309] holds no integer: the single value is round(0.3) = 0 with all the mass.
    space = build_output_space("gaussian", {"mu": 0.3, "sigma": 0.01}, decimals=0)
    assert space.values == ["0"]
    np.testing.assert_array_equal(space.probs, [1.0])


def test_negative_values_are_formatted_with_sign_and_padding():
    space = build_output_space("gaussian", {"mu": -1.5, "sigma": 0.001}, decimals=5)
    assert space.values[0] == "-1.50309" and space.values[-1] == "-1.49691"
    assert "-1.50000" in space.values


def test_equal_neighbour_strings_merge():
    # Near 6e14 float64 is spaced 0.125 apart, coarser than the 0.1 lattice: the products k * 0.1
    # of neighbouring k format to the same 1-decimal string (0.25 -> "0.2" after 0.2), so 21
    # lattice points give 17 distinct strings; merged strings add their masses.
    params = {"a": 6e14, "b": 6e14 + 2}
    space = build_output_space("uniform", params, decimals=1)
    k_lo, k_hi = math.ceil(space.lower / 0.1), math.floor(space.upper / 0.1)
    assert k_hi - k_lo + 1 == 21
    assert len(space) == 17 and len(set(space.values)) == 17
    assert space.values[:4] == [
        "600000000000000.0",
        "600000000000000.1",
        "600000000000000.2",
        "600000000000000.4",
    ]
    values, probs = reference_space("uniform", params, 1, 1001)
    assert space.values == values
    np.testing.assert_allclose(space.probs, probs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(space.probs, [0.0, 0.125] * 8 + [0.0], rtol=0, atol=1e-12)


def test_fallback_interval_when_quantile_bounds_are_unusable():
    # LogNormal(mu=700, sigma=5): SciPy's 99.9% quantile overflows to inf, so docs/method.md §4
    # falls back to [-10, 10]; the law has (numerically) no mass there and its whole tail lands on
    # "10.00".
    params = {"mu": 700.0, "sigma": 5.0}
    space = build_output_space("lognormal", params, decimals=2, max_bins=101)
    assert (space.lower, space.upper) == (-10.0, 10.0)
    assert len(space) == 101
    assert (
        space.values[0] == "-10.00" and space.values[50] == "0.00" and space.values[-1] == "10.00"
    )
    np.testing.assert_array_equal(space.probs, [0.0] * 100 + [1.0])
    values, probs = reference_space("lognormal", params, 2, 101)
    assert space.values == values
    np.testing.assert_allclose(space.probs, probs, rtol=0, atol=1e-12)


def test_build_output_spaces_accepts_specs_and_pairs():
    specs = splits()["test_ood_family"][:5]
    by_spec = build_output_spaces(specs, decimals=3, max_bins=101)
    by_pair = build_output_spaces([(s.family, s.params) for s in specs], decimals=3, max_bins=101)
    for spec, a, b in zip(specs, by_spec, by_pair):
        one = build_output_space(spec.family, spec.params, decimals=3, max_bins=101)
        assert a.values == b.values == one.values
        np.testing.assert_array_equal(a.probs, one.probs)
        np.testing.assert_array_equal(b.probs, one.probs)
        assert a.prompt == spec.prompt


# ------------------------------------------------------------------------------------------
# Bad input


def test_core_error_is_a_value_error():
    assert issubclass(_core.CalibftError, ValueError)
    with pytest.raises(_core.CalibftError, match="decimals"):
        _core.continuous_edges(0.0, 1.0, 10, 100)
    with pytest.raises(_core.CalibftError, match="max_bins"):
        _core.integer_values(0.0, 1.0, 1)


@pytest.mark.parametrize(
    "family, params, field",
    [
        ("gaussian", {"mu": 0.0}, "sigma"),
        ("gaussian", {"mu": 0.0, "sigma": 1.0, "nu": 3.0}, "nu"),
        ("gaussian", {"mu": math.nan, "sigma": 1.0}, "mu"),
        ("gaussian", {"mu": 0.0, "sigma": math.inf}, "sigma"),
        ("gaussian", {"mu": 0.0, "sigma": -1.0}, "sigma"),
        ("gaussian", {"mu": 0.0, "sigma": 0.0}, "sigma"),
        ("gaussian", {"mu": "0", "sigma": 1.0}, "mu"),
        ("bernoulli", {"p": 1.5}, "p"),
        ("binomial", {"n": 2.5, "p": 0.5}, "n"),
        ("binomial", {"n": -1, "p": 0.5}, "n"),
        ("uniform", {"a": 1.0, "b": 0.0}, "b"),
        ("hypergeometric", {"M": 10, "K": 11, "N": 3}, "K"),
        ("truncnorm", {"mu": 0, "sigma": 1, "lower": 1, "upper": 0}, "upper"),
    ],
)
def test_bad_params_name_the_field(family, params, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        build_output_space(family, params)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'normal'"):
        build_output_space("normal", {"mu": 0, "sigma": 1})


@pytest.mark.parametrize("decimals", [-1, 10, True, 1.5, "5", None])
def test_bad_decimals(decimals):
    with pytest.raises(ValueError, match=r"decimals.*\[0, 9\]"):
        build_output_space("gaussian", {"mu": 0, "sigma": 1}, decimals=decimals)


@pytest.mark.parametrize("max_bins", [1, 0, -5, 10**9, 2.0, False])
def test_bad_max_bins(max_bins):
    with pytest.raises(ValueError, match="max_bins"):
        build_output_space("poisson", {"lambda": 3}, max_bins=max_bins)
