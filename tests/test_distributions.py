import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from calibft import distributions
from calibft.distributions import (
    Family,
    _integer_ppf,
    families,
    format_param,
    frozen_law,
    frozen_law_batch,
    get_family,
    is_integer_family,
    law_ppf,
    load_spec,
    prompt_text,
    quantile_levels,
    support,
    validate_params,
)
from calibft.splits import SELECTIONS, splits
from calibft.targets import numeric

HELDOUT = {"bernoulli", "poisson", "weibull", "maxwell", "chi", "truncnorm"}

# One valid parameter set per family and the scipy law built by hand from docs/method.md §2.
CASES = {
    "uniform": ({"a": -1.0, "b": 2.5}, stats.uniform(loc=-1.0, scale=3.5)),
    "gaussian": ({"mu": 0.4, "sigma": 1.5}, stats.norm(loc=0.4, scale=1.5)),
    "bernoulli": ({"p": 0.3}, stats.bernoulli(0.3)),
    "beta": ({"alpha": 2.0, "beta": 0.7}, stats.beta(2.0, 0.7)),
    "binomial": ({"n": 10, "p": 0.35}, stats.binom(10, 0.35)),
    "poisson": ({"lambda": 4.0}, stats.poisson(4.0)),
    "exponential": ({"lambda": 2.0}, stats.expon(scale=0.5)),
    "geometric": ({"p": 0.3}, stats.geom(0.3)),
    "negative_binomial": ({"r": 5, "p": 0.4}, stats.nbinom(5, 0.4)),
    "lognormal": ({"mu": 0.5, "sigma": 0.8}, stats.lognorm(s=0.8, scale=math.exp(0.5))),
    "triangular": ({"a": -1.0, "c": 0.5, "b": 3.0}, stats.triang(c=0.375, loc=-1.0, scale=4.0)),
    "rayleigh": ({"sigma": 1.3}, stats.rayleigh(scale=1.3)),
    "cauchy": ({"x0": 1.0, "gamma": 0.5}, stats.cauchy(loc=1.0, scale=0.5)),
    "student_t": ({"nu": 3.5}, stats.t(3.5)),
    "chi_square": ({"nu": 4.0}, stats.chi2(4.0)),
    "f_distribution": ({"d1": 5, "d2": 10}, stats.f(5, 10)),
    "gamma": ({"alpha": 2.0, "beta": 3.0}, stats.gamma(2.0, scale=3.0)),
    "weibull": ({"k": 1.5, "lambda": 2.0}, stats.weibull_min(1.5, scale=2.0)),
    "laplace": ({"mu": -1.0, "b": 2.0}, stats.laplace(loc=-1.0, scale=2.0)),
    "logistic": ({"mu": 0.5, "s": 1.5}, stats.logistic(loc=0.5, scale=1.5)),
    "pareto": ({"alpha": 3.0, "xm": 1.5}, stats.pareto(3.0, scale=1.5)),
    "hypergeometric": ({"M": 30, "K": 10, "N": 25}, stats.hypergeom(30, 10, 25)),
    "gumbel": ({"mu": 1.0, "beta": 2.0}, stats.gumbel_r(loc=1.0, scale=2.0)),
    "skellam": ({"mu1": 3.0, "mu2": 1.5}, stats.skellam(3.0, 1.5)),
    "beta_binomial": ({"n": 20, "alpha": 2.0, "beta": 0.5}, stats.betabinom(20, 2.0, 0.5)),
    "lomax": ({"alpha": 2.0, "lambda": 3.0}, stats.lomax(2.0, scale=3.0)),
    "inverse_gaussian": ({"mu": 2.0, "lambda": 4.0}, stats.invgauss(0.5, scale=4.0)),
    "maxwell": ({"scale": 1.5}, stats.maxwell(scale=1.5)),
    "chi": ({"df": 3.0}, stats.chi(3.0)),
    "truncnorm": (
        {"mu": 1.0, "sigma": 1.5, "lower": -1.0, "upper": 2.0},
        stats.truncnorm(a=-4 / 3, b=2 / 3, loc=1.0, scale=1.5),
    ),
}

# docs/method.md §2 support bounds for the CASES parameters.
EXPECTED_SUPPORT = {
    "uniform": (-1.0, 2.5),
    "triangular": (-1.0, 3.0),
    "beta": (0.0, 1.0),
    "binomial": (0.0, 10.0),
    "beta_binomial": (0.0, 20.0),
    "bernoulli": (0.0, 1.0),
    "geometric": (1.0, math.inf),
    "poisson": (0.0, math.inf),
    "negative_binomial": (0.0, math.inf),
    "hypergeometric": (5.0, 10.0),  # max(0, 25 - (30 - 10)) .. min(25, 10)
    "pareto": (1.5, math.inf),
    "truncnorm": (-1.0, 2.0),
    "skellam": (-math.inf, math.inf),
}
POSITIVE = {
    "exponential", "lognormal", "rayleigh", "chi_square", "f_distribution", "gamma",
    "weibull", "lomax", "inverse_gaussian", "maxwell", "chi",
}  # fmt: skip


def test_family_table():
    table = families()
    assert len(table) == 30  # the paper's family count (docs/method.md §2)
    assert [f.id for f in table] == [e["id"] for e in load_spec()["families"]]
    assert set(CASES) == {f.id for f in table}
    assert {f.id for f in families("heldout_ood")} == HELDOUT
    assert families("train") + families("heldout_ood") == sorted(
        table, key=lambda f: f.split_role != "train"
    )
    nb = get_family("negative_binomial")
    assert isinstance(nb, Family)
    assert nb.display_name == "Negative Binomial" and nb.params == ("r", "p")
    assert nb.integer_only and is_integer_family("negative_binomial")
    assert not is_integer_family("gaussian")
    assert get_family("uniform").grid_axes == ("a", "width")
    with pytest.raises(ValueError, match="split_role must be one of train, heldout_ood"):
        families("test")


def test_family_records_are_complete():
    for family in families():
        # Each record carries its grids (by split role), selected rows and law.
        kinds = ("train", "test_unseen") if family.split_role == "train" else ("ood",)
        assert tuple(family.grids) == kinds
        for grid in family.grids.values():
            assert [name for name, _ in grid.axes] == list(family.grid_axes)
            assert grid.max_specs > 0 and all(axis.points() for _, axis in grid.axes)
        assert family.selected and all(set(row) == set(family.grid_axes) for row in family.selected)
        assert tuple(family.law.ranges) == family.params
        assert family.tier in ("I", "II", "III")


def test_unread_json_keys_are_refused():
    spec = load_spec()
    entry = {**spec["families"][0], "kind": "continuous"}
    with pytest.raises(ValueError, match=r"uniform has keys calibft does not read: \['kind'\]"):
        distributions._family(entry, spec["grid_defaults"])


def test_quantile_levels_are_the_tables():
    defaults = load_spec()["grid_defaults"]
    assert quantile_levels() == (defaults["quantile_low"], defaults["quantile_high"])
    assert (numeric.Q_LO, numeric.Q_HI) == quantile_levels()


def test_unknown_family_lists_valid_ids():
    with pytest.raises(ValueError, match="unknown family 'normal'.*gaussian"):
        get_family("normal")
    with pytest.raises(ValueError, match="unknown family"):
        frozen_law("normal", {"mu": 0.0, "sigma": 1.0})


def test_loaded_table_is_read_only():
    with pytest.raises(TypeError):
        load_spec()["grid_defaults"]["quantile_low"] = 0.5  # type: ignore[index]


@pytest.mark.parametrize("family_id", sorted(CASES))
def test_frozen_law_matches_scipy(family_id):
    params, expected = CASES[family_id]
    law = frozen_law(family_id, params)
    assert law.dist.name == get_family(family_id).scipy_name
    qs = np.array([0.01, 0.2, 0.5, 0.8, 0.99])
    xs = expected.ppf(qs)
    np.testing.assert_allclose(law.cdf(xs), expected.cdf(xs), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(law.ppf(qs), xs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family_id", sorted(CASES))
def test_support_per_spec_and_scipy(family_id):
    params, expected = CASES[family_id]
    lo, hi = support(family_id, params)
    if family_id in EXPECTED_SUPPORT:
        assert (lo, hi) == EXPECTED_SUPPORT[family_id]
    elif family_id in POSITIVE:
        assert (lo, hi) == (0.0, math.inf)
    else:
        assert (lo, hi) == (-math.inf, math.inf)
    # Our bounds contain scipy's support and agree with it wherever they are finite.
    s_lo, s_hi = expected.support()
    assert lo <= s_lo + 1e-12 and hi >= s_hi - 1e-12
    if math.isfinite(lo):
        assert lo == pytest.approx(s_lo, abs=1e-12)
    if math.isfinite(hi):
        assert hi == pytest.approx(s_hi, abs=1e-12)


def test_validate_params_returns_prompt_order_floats():
    out = validate_params("triangular", {"b": 3, "a": -1, "c": np.float32(0.5)})
    assert list(out) == ["a", "c", "b"]
    assert out == {"a": -1.0, "c": 0.5, "b": 3.0}
    assert all(type(v) is float for v in out.values())
    assert validate_params("binomial", {"n": np.int64(10), "p": 1.0}) == {"n": 10.0, "p": 1.0}


@pytest.mark.parametrize(
    ("family_id", "params", "pattern"),
    [
        ("gaussian", {"mu": 0.0}, "missing sigma"),
        ("gaussian", {"mu": 0.0, "sigma": 1.0, "tau": 2.0}, "unexpected tau"),
        ("gaussian", [0.0, 1.0], "params must be a mapping"),
        ("gaussian", {"mu": "0.5", "sigma": 1.0}, r"'mu' must be a finite number, got '0.5'"),
        ("gaussian", {"mu": True, "sigma": 1.0}, r"'mu' must be"),
        ("gaussian", {"mu": math.nan, "sigma": 1.0}, r"'mu' must be a finite number"),
        ("gaussian", {"mu": 0.0, "sigma": math.inf}, r"'sigma' must be a finite number > 0"),
        ("gaussian", {"mu": 0.0, "sigma": 0.0}, r"'sigma' must be a finite number > 0, got 0"),
        ("lognormal", {"mu": 0.0, "sigma": -1.0}, r"'sigma' must be a finite number > 0"),
        ("binomial", {"n": 10, "p": 1.5}, r"'p' must be a finite number in \[0, 1\], got 1.5"),
        ("binomial", {"n": 2.5, "p": 0.5}, r"'n' must be an integer >= 0, got 2.5"),
        ("binomial", {"n": -1, "p": 0.5}, r"'n' must be an integer >= 0"),
        ("geometric", {"p": 0.0}, r"'p' must be a finite number in \(0, 1\]"),
        ("negative_binomial", {"r": 0, "p": 0.5}, r"'r' must be an integer >= 1"),
        ("bernoulli", {"p": -0.1}, r"'p' must be a finite number in \[0, 1\]"),
        ("uniform", {"a": 2.0, "b": 2.0}, r"'b' must be greater than a \(got a=2, b=2\)"),
        ("triangular", {"a": 0.0, "c": 1.5, "b": 1.0}, r"'c' must be between a and b"),
        ("triangular", {"a": 1.0, "c": 1.0, "b": 0.0}, r"'b' must be greater than a"),
        ("truncnorm", {"mu": 0, "sigma": 1, "lower": 1, "upper": -1}, "'upper' must be greater"),
        ("hypergeometric", {"M": 10, "K": 11, "N": 5}, r"'K' must be at most M"),
        ("hypergeometric", {"M": 10, "K": 5, "N": 11}, r"'N' must be at most M"),
        ("hypergeometric", {"M": 0, "K": 0, "N": 0}, r"'M' must be an integer >= 1"),
        ("student_t", {"nu": 0.0}, r"'nu' must be a finite number > 0"),
        ("skellam", {"mu1": 0.0, "mu2": 1.0}, r"'mu1' must be a finite number > 0"),
        ("pareto", {"alpha": 2.0, "xm": -1.0}, r"'xm' must be a finite number > 0"),
    ],
)
def test_validate_params_rejects(family_id, params, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        validate_params(family_id, params)
    assert str(info.value).startswith(f"{family_id}: ")
    # The same checks guard every entry point.
    with pytest.raises(ValueError):
        frozen_law(family_id, params)
    with pytest.raises(ValueError):
        prompt_text(family_id, params)


def test_boundary_values_accepted():
    validate_params("triangular", {"a": 0.0, "c": 0.0, "b": 1.0})
    validate_params("triangular", {"a": 0.0, "c": 1.0, "b": 1.0})
    validate_params("hypergeometric", {"M": 10, "K": 10, "N": 10})
    validate_params("binomial", {"n": 0, "p": 0.0})
    validate_params("geometric", {"p": 1.0})


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.40000000000000036, "0.4"),
        (0.3999999999999999, "0.4"),
        (2.0, "2"),
        (10, "10"),
        (-0.0, "0"),
        (-3.5, "-3.5"),
        (1e-7, "0.0000001"),
        (1.2345678901234567e-5, "0.0000123456789012"),
        (1e20, "100000000000000000000"),
        (0.1 + 0.2, "0.3"),
        (2.5198420997897464, "2.51984209979"),
    ],
)
def test_format_param_examples(x, text):
    assert format_param(x) == text


def test_format_param_rejects_non_finite():
    with pytest.raises(ValueError, match="finite"):
        format_param(math.inf)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15))
def test_format_param_round_trips(x):
    text = format_param(x)
    assert float(text) == float(f"{x:.12g}")
    assert "e" not in text.lower()
    # At most 12 significant digits: no float noise such as 0.40000000000000036.
    assert len(text.lstrip("-").replace(".", "").strip("0")) <= 12
    if float(text).is_integer():
        assert "." not in text


def test_prompt_text_exact():
    assert prompt_text("gaussian", {"sigma": 1.5, "mu": 0.40000000000000036}) == (
        "Generate exactly ONE random number from a Gaussian distribution with parameters "
        "mu=0.4, sigma=1.5. Output ONLY the number."
    )
    nb = prompt_text("negative_binomial", {"r": 5.0, "p": 0.25})
    assert "from a Negative Binomial distribution with parameters r=5, p=0.25." in nb
    assert "parameters n=10, p=0.5." in prompt_text("binomial", {"n": 10.0, "p": 0.5})


def test_law_ppf_inverts_the_cdf_where_scipy_bisection_gives_up():
    law = frozen_law("skellam", {"mu1": 1.0, "mu2": 8.0})
    levels = (np.arange(64) + 0.5) / 64
    with pytest.raises(RuntimeError):  # SciPy's own discrete ppf (if this passes, SciPy fixed it)
        law.ppf(levels)
    ks = law_ppf(law, levels)
    assert (ks == np.round(ks)).all()
    # the smallest integer k with F(k) >= level
    assert (law.cdf(ks) >= levels).all() and (law.cdf(ks - 1) < levels).all()
    # batched: each row is its own law's quantiles
    batch = frozen_law_batch("skellam", [{"mu1": 1.0, "mu2": 8.0}, {"mu1": 2.0, "mu2": 2.0}])
    rows = law_ppf(batch, levels[None, :])
    np.testing.assert_array_equal(rows[0], ks)
    np.testing.assert_array_equal(
        rows[1], law_ppf(frozen_law("skellam", {"mu1": 2.0, "mu2": 2.0}), levels)
    )


@pytest.mark.parametrize("family_id", ["poisson", "binomial", "geometric", "negative_binomial"])
def test_law_ppf_equals_scipy_where_scipy_works(family_id):
    law = frozen_law(family_id, CASES[family_id][0])
    levels = np.linspace(0.001, 0.999, 57)
    np.testing.assert_array_equal(law_ppf(law, levels), law.ppf(levels))
    np.testing.assert_array_equal(_integer_ppf(law, levels), law.ppf(levels))


def documented_support(family_id, p):
    """The support column of docs/method.md §2."""
    bounded = {
        "uniform": lambda: (p["a"], p["b"]),
        "triangular": lambda: (p["a"], p["b"]),
        "truncnorm": lambda: (p["lower"], p["upper"]),
        "beta": lambda: (0.0, 1.0),
        "bernoulli": lambda: (0.0, 1.0),
        "binomial": lambda: (0.0, p["n"]),
        "beta_binomial": lambda: (0.0, p["n"]),
        "hypergeometric": lambda: (max(0.0, p["N"] - (p["M"] - p["K"])), min(p["N"], p["K"])),
        "geometric": lambda: (1.0, math.inf),
        "pareto": lambda: (p["xm"], math.inf),
    }
    if family_id in bounded:
        return bounded[family_id]()
    if family_id in POSITIVE or family_id in ("poisson", "negative_binomial"):
        return (0.0, math.inf)
    return (-math.inf, math.inf)


def test_scipy_support_equals_the_documented_one_on_every_grid_row():
    # `support` reads SciPy's; it must equal the table's formula exactly wherever calibft builds
    # a prompt (every grid and selected row of every family).
    specs = {s for selection in SELECTIONS for v in splits(selection).values() for s in v}
    assert {s.family for s in specs} == set(CASES)
    for spec in specs:
        assert support(spec.family, spec.params) == documented_support(spec.family, spec.params)
