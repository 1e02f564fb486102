"""The 30 distribution families: their SciPy laws, parameter checks, supports and prompt text.

`data/families.json` is the single source of the family table (names, prompt parameters, grids);
this module adds what JSON cannot hold: how each family's parameters map onto the exact
`scipy.stats` law, which parameter values are valid, and the support bounds of docs/method.md §2.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "Family",
    "families",
    "format_param",
    "frozen_law",
    "get_family",
    "is_integer_family",
    "load_spec",
    "prompt_text",
    "support",
    "validate_params",
]

PROMPT_TEMPLATE = (
    "Generate exactly ONE random number from a {display} distribution with parameters {params}. "
    "Output ONLY the number."
)

Params = Mapping[str, float]


@dataclass(frozen=True)
class Family:
    """One distribution family as described in `families.json`."""

    id: str
    display_name: str
    tier: str
    kind: str  # "continuous" or "discrete"
    integer_only: bool
    params: tuple[str, ...]  # prompt parameters, in prompt order
    grid_axes: tuple[str, ...]  # grid coordinates; see calibft.splits for the map to params
    scipy_name: str
    split_role: str  # "train" or "heldout_ood"


def _freeze(value: Any) -> Any:
    """Read-only copy of parsed JSON, so the cached table cannot be changed by a caller."""
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


@lru_cache(maxsize=1)
def load_spec() -> Mapping[str, Any]:
    """The parsed, read-only `families.json` (grid defaults, family lists and family entries)."""
    text = (resources.files(__package__) / "data" / "families.json").read_text("utf-8")
    spec: Mapping[str, Any] = _freeze(json.loads(text))
    return spec


@lru_cache(maxsize=1)
def _family_index() -> Mapping[str, Family]:
    index = {}
    for entry in load_spec()["families"]:
        index[entry["id"]] = Family(
            id=entry["id"],
            display_name=entry["display_name"],
            tier=entry["tier"],
            kind=entry["kind"],
            integer_only=entry["integer_only"],
            params=tuple(entry["params"]),
            grid_axes=tuple(entry["grid_axes"]),
            scipy_name=entry["scipy_name"],
            split_role=entry["split_role"],
        )
    return MappingProxyType(index)


def families() -> list[Family]:
    """All families, in `families.json` order."""
    return list(_family_index().values())


def get_family(family_id: str) -> Family:
    """The family with this id; ValueError listing the valid ids otherwise."""
    index = _family_index()
    if family_id not in index:
        raise ValueError(f"unknown family {family_id!r}; valid ids: {', '.join(index)}")
    return index[family_id]


def is_integer_family(family_id: str) -> bool:
    """Whether the family's samples are integers (its output space is every integer in range)."""
    return get_family(family_id).integer_only


# ---------------------------------------------------------------------------------------------
# Parameter ranges


@dataclass(frozen=True)
class _Range:
    """Allowed values of one parameter: an interval, optionally restricted to integers."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    integer: bool = False

    def contains(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below and (not self.integer or x.is_integer())

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low == -math.inf and self.high == math.inf:
            return kind
        if self.high == math.inf:
            return f"{kind} {'>=' if self.low_closed else '>'} {format_param(self.low)}"
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{kind} in {left}{format_param(self.low)}, {format_param(self.high)}{right}"


_REAL = _Range()
_POSITIVE = _Range(low=0.0)
_UNIT_CLOSED = _Range(low=0.0, high=1.0, low_closed=True, high_closed=True)
# Success probability of a waiting-time law: p = 0 would never stop.
_UNIT_OPEN_CLOSED = _Range(low=0.0, high=1.0, high_closed=True)
_COUNT = _Range(low=0.0, low_closed=True, integer=True)
_POSITIVE_COUNT = _Range(low=1.0, low_closed=True, integer=True)


@dataclass(frozen=True)
class _Constraint:
    """A condition across parameters; `field` is the parameter blamed when it fails."""

    field: str
    holds: Callable[[Params], bool]
    allowed: str


@dataclass(frozen=True)
class _Law:
    ranges: Mapping[str, _Range]
    build: Callable[[Params], Any]  # validated params -> frozen scipy.stats law
    support: Callable[[Params], tuple[float, float]]
    constraints: tuple[_Constraint, ...] = ()


_UNBOUNDED = (-math.inf, math.inf)
_HALF_LINE = (0.0, math.inf)


def _law(
    ranges: dict[str, _Range],
    build: Callable[[Params], Any],
    support: Callable[[Params], tuple[float, float]],
    *constraints: _Constraint,
) -> _Law:
    return _Law(MappingProxyType(ranges), build, support, constraints)


def _count(x: Any) -> Any:
    """An integer parameter as SciPy's samplers need it: a validated integral float, or a column
    of them (`frozen_law_batch`), as int64."""
    return np.rint(x).astype(np.int64)


def _hypergeometric_support(p: Params) -> tuple[float, float]:
    return (max(0.0, p["N"] - (p["M"] - p["K"])), min(p["N"], p["K"]))


# One entry per family id; `build` follows each family's `scipy_args` in families.json exactly,
# with NumPy arithmetic only, so that it also builds one law over columns of parameters
# (`frozen_law_batch`).
_LAWS: Mapping[str, _Law] = MappingProxyType(
    {
        "uniform": _law(
            {"a": _REAL, "b": _REAL},
            lambda p: stats.uniform(loc=p["a"], scale=p["b"] - p["a"]),
            lambda p: (p["a"], p["b"]),
            _Constraint("b", lambda p: p["b"] > p["a"], "greater than a"),
        ),
        "gaussian": _law(
            {"mu": _REAL, "sigma": _POSITIVE},
            lambda p: stats.norm(loc=p["mu"], scale=p["sigma"]),
            lambda p: _UNBOUNDED,
        ),
        "bernoulli": _law(
            {"p": _UNIT_CLOSED},
            lambda p: stats.bernoulli(p=p["p"]),
            lambda p: (0.0, 1.0),
        ),
        "beta": _law(
            {"alpha": _POSITIVE, "beta": _POSITIVE},
            lambda p: stats.beta(a=p["alpha"], b=p["beta"]),
            lambda p: (0.0, 1.0),
        ),
        "binomial": _law(
            {"n": _COUNT, "p": _UNIT_CLOSED},
            lambda p: stats.binom(n=_count(p["n"]), p=p["p"]),
            lambda p: (0.0, p["n"]),
        ),
        "poisson": _law(
            {"lambda": _POSITIVE},
            lambda p: stats.poisson(mu=p["lambda"]),
            lambda p: _HALF_LINE,
        ),
        "exponential": _law(
            {"lambda": _POSITIVE},
            lambda p: stats.expon(scale=1.0 / p["lambda"]),
            lambda p: _HALF_LINE,
        ),
        "geometric": _law(
            {"p": _UNIT_OPEN_CLOSED},
            lambda p: stats.geom(p=p["p"]),
            lambda p: (1.0, math.inf),
        ),
        "negative_binomial": _law(
            {"r": _POSITIVE_COUNT, "p": _UNIT_OPEN_CLOSED},
            lambda p: stats.nbinom(n=_count(p["r"]), p=p["p"]),
            lambda p: _HALF_LINE,
        ),
        "lognormal": _law(
            {"mu": _REAL, "sigma": _POSITIVE},
            lambda p: stats.lognorm(s=p["sigma"], scale=np.exp(p["mu"])),
            lambda p: _HALF_LINE,
        ),
        "triangular": _law(
            {"a": _REAL, "c": _REAL, "b": _REAL},
            lambda p: stats.triang(
                c=(p["c"] - p["a"]) / (p["b"] - p["a"]), loc=p["a"], scale=p["b"] - p["a"]
            ),
            lambda p: (p["a"], p["b"]),
            _Constraint("b", lambda p: p["b"] > p["a"], "greater than a"),
            _Constraint("c", lambda p: p["a"] <= p["c"] <= p["b"], "between a and b"),
        ),
        "rayleigh": _law(
            {"sigma": _POSITIVE},
            lambda p: stats.rayleigh(scale=p["sigma"]),
            lambda p: _HALF_LINE,
        ),
        "cauchy": _law(
            {"x0": _REAL, "gamma": _POSITIVE},
            lambda p: stats.cauchy(loc=p["x0"], scale=p["gamma"]),
            lambda p: _UNBOUNDED,
        ),
        "student_t": _law(
            {"nu": _POSITIVE},
            lambda p: stats.t(df=p["nu"]),
            lambda p: _UNBOUNDED,
        ),
        "chi_square": _law(
            {"nu": _POSITIVE},
            lambda p: stats.chi2(df=p["nu"]),
            lambda p: _HALF_LINE,
        ),
        "f_distribution": _law(
            {"d1": _POSITIVE, "d2": _POSITIVE},
            lambda p: stats.f(dfn=p["d1"], dfd=p["d2"]),
            lambda p: _HALF_LINE,
        ),
        "gamma": _law(
            {"alpha": _POSITIVE, "beta": _POSITIVE},
            lambda p: stats.gamma(a=p["alpha"], scale=p["beta"]),
            lambda p: _HALF_LINE,
        ),
        "weibull": _law(
            {"k": _POSITIVE, "lambda": _POSITIVE},
            lambda p: stats.weibull_min(c=p["k"], scale=p["lambda"]),
            lambda p: _HALF_LINE,
        ),
        "laplace": _law(
            {"mu": _REAL, "b": _POSITIVE},
            lambda p: stats.laplace(loc=p["mu"], scale=p["b"]),
            lambda p: _UNBOUNDED,
        ),
        "logistic": _law(
            {"mu": _REAL, "s": _POSITIVE},
            lambda p: stats.logistic(loc=p["mu"], scale=p["s"]),
            lambda p: _UNBOUNDED,
        ),
        "pareto": _law(
            {"alpha": _POSITIVE, "xm": _POSITIVE},
            lambda p: stats.pareto(b=p["alpha"], scale=p["xm"]),
            lambda p: (p["xm"], math.inf),
        ),
        "hypergeometric": _law(
            {"M": _POSITIVE_COUNT, "K": _COUNT, "N": _COUNT},
            lambda p: stats.hypergeom(M=_count(p["M"]), n=_count(p["K"]), N=_count(p["N"])),
            _hypergeometric_support,
            _Constraint("K", lambda p: p["K"] <= p["M"], "at most M"),
            _Constraint("N", lambda p: p["N"] <= p["M"], "at most M"),
        ),
        "gumbel": _law(
            {"mu": _REAL, "beta": _POSITIVE},
            lambda p: stats.gumbel_r(loc=p["mu"], scale=p["beta"]),
            lambda p: _UNBOUNDED,
        ),
        "skellam": _law(
            {"mu1": _POSITIVE, "mu2": _POSITIVE},
            lambda p: stats.skellam(mu1=p["mu1"], mu2=p["mu2"]),
            lambda p: _UNBOUNDED,
        ),
        "beta_binomial": _law(
            {"n": _COUNT, "alpha": _POSITIVE, "beta": _POSITIVE},
            lambda p: stats.betabinom(n=_count(p["n"]), a=p["alpha"], b=p["beta"]),
            lambda p: (0.0, p["n"]),
        ),
        "lomax": _law(
            {"alpha": _POSITIVE, "lambda": _POSITIVE},
            lambda p: stats.lomax(c=p["alpha"], scale=p["lambda"]),
            lambda p: _HALF_LINE,
        ),
        "inverse_gaussian": _law(
            {"mu": _POSITIVE, "lambda": _POSITIVE},
            lambda p: stats.invgauss(mu=p["mu"] / p["lambda"], scale=p["lambda"]),
            lambda p: _HALF_LINE,
        ),
        "maxwell": _law(
            {"scale": _POSITIVE},
            lambda p: stats.maxwell(scale=p["scale"]),
            lambda p: _HALF_LINE,
        ),
        "chi": _law(
            {"df": _POSITIVE},
            lambda p: stats.chi(df=p["df"]),
            lambda p: _HALF_LINE,
        ),
        "truncnorm": _law(
            {"mu": _REAL, "sigma": _POSITIVE, "lower": _REAL, "upper": _REAL},
            lambda p: stats.truncnorm(
                a=(p["lower"] - p["mu"]) / p["sigma"],
                b=(p["upper"] - p["mu"]) / p["sigma"],
                loc=p["mu"],
                scale=p["sigma"],
            ),
            lambda p: (p["lower"], p["upper"]),
            _Constraint("upper", lambda p: p["upper"] > p["lower"], "greater than lower"),
        ),
    }
)


def validate_params(family_id: str, params: Params) -> dict[str, float]:
    """Checked parameters as floats in the family's prompt order.

    Raises ValueError naming the offending field and its allowed range for a missing, extra,
    non-numeric, non-finite or out-of-range parameter.
    """
    family = get_family(family_id)
    if not isinstance(params, Mapping):
        raise ValueError(
            f"{family_id}: params must be a mapping of {', '.join(family.params)} to numbers, "
            f"got {type(params).__name__}"
        )
    missing = [name for name in family.params if name not in params]
    extra = [name for name in params if name not in family.params]
    if missing or extra:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected {', '.join(map(str, extra))}"] if extra else []
        raise ValueError(
            f"{family_id}: {'; '.join(parts)} (expected parameters: {', '.join(family.params)})"
        )
    law = _LAWS[family_id]
    checked: dict[str, float] = {}
    for name in family.params:
        value = params[name]
        allowed = law.ranges[name]
        # bool is a numbers.Real but never a meant parameter value.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"{family_id}: parameter {name!r} must be {allowed.describe()}, got {value!r}"
            )
        x = float(value)
        if not math.isfinite(x) or not allowed.contains(x):
            raise ValueError(
                f"{family_id}: parameter {name!r} must be {allowed.describe()}, got {value!r}"
            )
        checked[name] = x
    for constraint in law.constraints:
        if not constraint.holds(checked):
            values = ", ".join(f"{k}={format_param(v)}" for k, v in checked.items())
            raise ValueError(
                f"{family_id}: parameter {constraint.field!r} must be {constraint.allowed} "
                f"(got {values})"
            )
    return checked


def frozen_law(family_id: str, params: Params) -> Any:
    """The exact frozen `scipy.stats` distribution of the family (SciPy is the ground truth)."""
    checked = validate_params(family_id, params)  # also rejects unknown family ids
    return _LAWS[family_id].build(checked)


def frozen_law_batch(family_id: str, params_list: Sequence[Params]) -> Any:
    """One frozen `scipy.stats` law over k parameter sets, its parameters columns of shape [k, 1]:
    ``law.ppf(levels[None, :])`` gives k rows at once (one SciPy call instead of k)."""
    if not params_list:
        raise ValueError("frozen_law_batch needs at least one parameter set")
    checked = [validate_params(family_id, params) for params in params_list]
    columns = {name: np.array([c[name] for c in checked])[:, None] for name in checked[0]}
    return _LAWS[family_id].build(columns)


def law_ppf(law: Any, levels: Any) -> np.ndarray:
    """``law.ppf(levels)`` as float64, also where SciPy's discrete ppf gives up.

    SciPy inverts a discrete CDF by bisection, which stops with "updating stopped, endless loop"
    for some parameters (e.g. Skellam mu1=1, mu2=8 at level 0.117). There the quantile is found
    from the CDF itself: the smallest integer k with F(k) >= level. ``law`` may be batched
    (`frozen_law_batch`: parameter columns [k, 1], levels [1, n] -> [k, n]).
    """
    try:
        return np.asarray(law.ppf(levels), dtype=np.float64)
    except RuntimeError:
        if not isinstance(law.dist, stats.rv_discrete):
            raise
    levels = np.asarray(levels, dtype=np.float64)
    params = {name: np.asarray(value) for name, value in law.kwds.items()}
    if all(value.ndim == 0 for value in params.values()):
        return _integer_ppf(law, levels)
    rows = next(value.shape[0] for value in params.values() if value.ndim)
    return np.stack(
        [
            _integer_ppf(
                law.dist(**{k: v[i, 0] if v.ndim else v for k, v in params.items()}), levels.ravel()
            )
            for i in range(rows)
        ]
    )


def _integer_ppf(law: Any, levels: np.ndarray) -> np.ndarray:
    """Smallest integer k with F(k) >= level, by search over F on a window around the mean that
    grows until it brackets every level."""
    lo_support, hi_support = (float(x) for x in law.support())
    mean, var = (float(x) for x in law.stats())
    half_width = 10.0 * math.sqrt(var) + 10.0
    for _ in range(8):
        lo = max(lo_support, math.floor(mean - half_width))
        hi = min(hi_support, math.ceil(mean + half_width))
        ks = np.arange(lo, hi + 1, dtype=np.float64)
        cdf = np.maximum.accumulate(law.cdf(ks))  # guard against rounding wiggles
        if (lo == lo_support or cdf[0] < levels.min()) and (
            hi == hi_support or cdf[-1] >= levels.max()
        ):
            return ks[np.minimum(np.searchsorted(cdf, levels, side="left"), len(ks) - 1)]
        half_width *= 4.0
    raise ValueError(
        f"cannot invert the CDF of {law.dist.name}{law.kwds} at levels {levels.min()}..{levels.max()}"
    )


def support(family_id: str, params: Params) -> tuple[float, float]:
    """Support bounds (lo, hi) of docs/method.md §2 as floats; unbounded sides are +-inf."""
    checked = validate_params(family_id, params)
    lo, hi = _LAWS[family_id].support(checked)
    return float(lo), float(hi)


def format_param(x: float) -> str:
    """Clean decimal text of a parameter value.

    Integers print without a decimal point; other values print as the shortest decimal that
    round-trips after rounding to 12 significant digits, never in exponent notation, so float
    noise such as 0.40000000000000036 prints as 0.4.
    """
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"parameter value must be finite, got {x!r}")
    rounded = float(f"{value:.12g}")
    if rounded.is_integer():
        return str(int(rounded))
    # repr is the shortest round-tripping text; Decimal's "f" format expands any exponent.
    return format(Decimal(repr(rounded)), "f")


def prompt_text(family_id: str, params: Params) -> str:
    """The task prompt of docs/method.md §1 for one family and parameter set."""
    checked = validate_params(family_id, params)
    rendered = ", ".join(f"{name}={format_param(value)}" for name, value in checked.items())
    return PROMPT_TEMPLATE.format(display=get_family(family_id).display_name, params=rendered)
