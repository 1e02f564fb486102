"""The distribution families: one record each, read from `data/families.json` and `_LAWS`.

A family's data (display name, prompt parameters, SciPy law name, split role, parameter grids)
is its `families.json` entry; what JSON cannot hold is its `_LAWS` entry: how the parameters map
onto the `scipy.stats` law, which values are valid, and how grid coordinates become prompt
parameters. `Family` joins the two; docs/adding-a-family.md is the walk-through.

SciPy is imported on first use of a law, so the registry and the splits load without it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = [
    "Axis",
    "Family",
    "Grid",
    "Law",
    "families",
    "format_param",
    "frozen_law",
    "get_family",
    "is_integer_family",
    "load_spec",
    "prompt_text",
    "quantile_levels",
    "support",
    "validate_params",
]

PROMPT_TEMPLATE = (
    "Generate exactly ONE random number from a {display} distribution with parameters {params}. "
    "Output ONLY the number."
)

Params = Mapping[str, float]
GridRow = dict[str, float]
SPLIT_ROLES = ("train", "heldout_ood")
"""`split_role` values: training families (train and test_unseen grids) and held-out ones (ood)."""
GRID_KINDS = MappingProxyType({"train": ("train", "test_unseen"), "heldout_ood": ("ood",)})
"""The grids each split role declares."""
SELECTED_KIND = MappingProxyType({"train": "test_selected", "heldout_ood": "ood_selected"})
"""The key of the paper's evaluation configurations of each split role."""


# ---------------------------------------------------------------------------------------------
# Parameter ranges and laws: the code half of a family record


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


def _identity(row: GridRow) -> GridRow:
    return dict(row)


@dataclass(frozen=True)
class Law:
    """How a family's validated parameters become its `scipy.stats` law, and its grid map.

    `args` gives the keyword arguments of `scipy.stats.<scipy_name>`, with NumPy arithmetic
    only, so that it also builds one law over columns of parameters (`frozen_law_batch`).
    `grid` maps a grid row (coordinates named by `grid_axes`) to prompt parameters.
    """

    ranges: Mapping[str, _Range]
    args: Callable[[Params], dict[str, Any]]
    constraints: tuple[_Constraint, ...] = ()
    grid: Callable[[GridRow], GridRow] = _identity


def _law(
    ranges: dict[str, _Range],
    args: Callable[[Params], dict[str, Any]],
    *constraints: _Constraint,
    grid: Callable[[GridRow], GridRow] = _identity,
) -> Law:
    return Law(MappingProxyType(ranges), args, constraints, grid)


def _count(x: Any) -> Any:
    """An integer parameter as SciPy's samplers need it: a validated integral float, or a column
    of them (`frozen_law_batch`), as int64."""
    return np.rint(x).astype(np.int64)


def _rounded(*names: str) -> Callable[[GridRow], GridRow]:
    # Python's round is half-to-even, as docs/method.md §3 states for every grid rounding.
    return lambda row: {**row, **{name: float(round(row[name])) for name in names}}


def _hypergeometric_grid(row: GridRow) -> GridRow:
    population = round(row["M"])
    successes = min(population, max(0, round(population * row["success_fraction"])))
    draws = min(round(row["N"]), population)
    return {"M": float(population), "K": float(successes), "N": float(draws)}


_B_ABOVE_A = _Constraint("b", lambda p: p["b"] > p["a"], "greater than a")

# One entry per family id (the law's name is the entry's `scipy_name` in families.json).
_LAWS: Mapping[str, Law] = MappingProxyType(
    {
        "uniform": _law(
            {"a": _REAL, "b": _REAL},
            lambda p: {"loc": p["a"], "scale": p["b"] - p["a"]},
            _B_ABOVE_A,
            grid=lambda g: {"a": g["a"], "b": g["a"] + g["width"]},
        ),
        "gaussian": _law(
            {"mu": _REAL, "sigma": _POSITIVE}, lambda p: {"loc": p["mu"], "scale": p["sigma"]}
        ),
        "bernoulli": _law({"p": _UNIT_CLOSED}, lambda p: {"p": p["p"]}),
        "beta": _law(
            {"alpha": _POSITIVE, "beta": _POSITIVE}, lambda p: {"a": p["alpha"], "b": p["beta"]}
        ),
        "binomial": _law(
            {"n": _COUNT, "p": _UNIT_CLOSED},
            lambda p: {"n": _count(p["n"]), "p": p["p"]},
            grid=_rounded("n"),
        ),
        "poisson": _law({"lambda": _POSITIVE}, lambda p: {"mu": p["lambda"]}),
        "exponential": _law({"lambda": _POSITIVE}, lambda p: {"scale": 1.0 / p["lambda"]}),
        "geometric": _law({"p": _UNIT_OPEN_CLOSED}, lambda p: {"p": p["p"]}),
        "negative_binomial": _law(
            {"r": _POSITIVE_COUNT, "p": _UNIT_OPEN_CLOSED},
            lambda p: {"n": _count(p["r"]), "p": p["p"]},
            grid=_rounded("r"),
        ),
        "lognormal": _law(
            {"mu": _REAL, "sigma": _POSITIVE},
            lambda p: {"s": p["sigma"], "scale": np.exp(p["mu"])},
        ),
        "triangular": _law(
            {"a": _REAL, "c": _REAL, "b": _REAL},
            lambda p: {
                "c": (p["c"] - p["a"]) / (p["b"] - p["a"]),
                "loc": p["a"],
                "scale": p["b"] - p["a"],
            },
            _B_ABOVE_A,
            _Constraint("c", lambda p: p["a"] <= p["c"] <= p["b"], "between a and b"),
            grid=lambda g: {
                "a": g["a"],
                "c": g["a"] + g["width"] * g["mode_fraction"],
                "b": g["a"] + g["width"],
            },
        ),
        "rayleigh": _law({"sigma": _POSITIVE}, lambda p: {"scale": p["sigma"]}),
        "cauchy": _law(
            {"x0": _REAL, "gamma": _POSITIVE}, lambda p: {"loc": p["x0"], "scale": p["gamma"]}
        ),
        "student_t": _law({"nu": _POSITIVE}, lambda p: {"df": p["nu"]}),
        "chi_square": _law({"nu": _POSITIVE}, lambda p: {"df": p["nu"]}),
        "f_distribution": _law(
            {"d1": _POSITIVE, "d2": _POSITIVE}, lambda p: {"dfn": p["d1"], "dfd": p["d2"]}
        ),
        "gamma": _law(
            {"alpha": _POSITIVE, "beta": _POSITIVE},
            lambda p: {"a": p["alpha"], "scale": p["beta"]},
        ),
        "weibull": _law(
            {"k": _POSITIVE, "lambda": _POSITIVE}, lambda p: {"c": p["k"], "scale": p["lambda"]}
        ),
        "laplace": _law({"mu": _REAL, "b": _POSITIVE}, lambda p: {"loc": p["mu"], "scale": p["b"]}),
        "logistic": _law(
            {"mu": _REAL, "s": _POSITIVE}, lambda p: {"loc": p["mu"], "scale": p["s"]}
        ),
        "pareto": _law(
            {"alpha": _POSITIVE, "xm": _POSITIVE}, lambda p: {"b": p["alpha"], "scale": p["xm"]}
        ),
        "hypergeometric": _law(
            {"M": _POSITIVE_COUNT, "K": _COUNT, "N": _COUNT},
            lambda p: {"M": _count(p["M"]), "n": _count(p["K"]), "N": _count(p["N"])},
            _Constraint("K", lambda p: p["K"] <= p["M"], "at most M"),
            _Constraint("N", lambda p: p["N"] <= p["M"], "at most M"),
            grid=_hypergeometric_grid,
        ),
        "gumbel": _law(
            {"mu": _REAL, "beta": _POSITIVE}, lambda p: {"loc": p["mu"], "scale": p["beta"]}
        ),
        "skellam": _law(
            {"mu1": _POSITIVE, "mu2": _POSITIVE}, lambda p: {"mu1": p["mu1"], "mu2": p["mu2"]}
        ),
        "beta_binomial": _law(
            {"n": _COUNT, "alpha": _POSITIVE, "beta": _POSITIVE},
            lambda p: {"n": _count(p["n"]), "a": p["alpha"], "b": p["beta"]},
            grid=_rounded("n"),
        ),
        "lomax": _law(
            {"alpha": _POSITIVE, "lambda": _POSITIVE},
            lambda p: {"c": p["alpha"], "scale": p["lambda"]},
        ),
        "inverse_gaussian": _law(
            {"mu": _POSITIVE, "lambda": _POSITIVE},
            lambda p: {"mu": p["mu"] / p["lambda"], "scale": p["lambda"]},
        ),
        "maxwell": _law({"scale": _POSITIVE}, lambda p: {"scale": p["scale"]}),
        "chi": _law({"df": _POSITIVE}, lambda p: {"df": p["df"]}),
        "truncnorm": _law(
            {"mu": _REAL, "sigma": _POSITIVE, "lower": _REAL, "upper": _REAL},
            lambda p: {
                "a": (p["lower"] - p["mu"]) / p["sigma"],
                "b": (p["upper"] - p["mu"]) / p["sigma"],
                "loc": p["mu"],
                "scale": p["sigma"],
            },
            _Constraint("upper", lambda p: p["upper"] > p["lower"], "greater than lower"),
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# The family table


@dataclass(frozen=True)
class Axis:
    """One grid coordinate: its listed `values`, or `num_points` from `low` to `high`, spaced
    "linspace" (numpy.linspace) or "logspace" (numpy.geomspace)."""

    values: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 0.0
    num_points: int = 0
    spacing: str = "linspace"

    def points(self) -> list[float]:
        if self.values:
            return list(self.values)
        space = np.linspace if self.spacing == "linspace" else np.geomspace
        return [float(v) for v in space(self.low, self.high, self.num_points)]


@dataclass(frozen=True)
class Grid:
    """One parameter grid of a family: its axes in `grid_axes` order, and the most rows kept."""

    axes: tuple[tuple[str, Axis], ...]
    max_specs: int


@dataclass(frozen=True)
class Family:
    """One distribution family: its `families.json` entry and its `_LAWS` entry."""

    id: str
    display_name: str
    tier: str  # the paper's difficulty tier: "I", "II" or "III"
    integer_only: bool  # samples are integers (discrete law); otherwise continuous
    params: tuple[str, ...]  # prompt parameters, in prompt order
    grid_axes: tuple[str, ...]  # grid coordinates, mapped to params by `law.grid`
    scipy_name: str  # the scipy.stats distribution
    split_role: str  # "train" or "heldout_ood"
    grids: Mapping[str, Grid]  # "train", "test_unseen" (training families) or "ood"
    # The paper's evaluation rows, in grid coordinates (test_selected / ood_selected).
    selected: tuple[Mapping[str, float], ...]
    law: Law = field(repr=False, compare=False)


def _freeze(value: Any) -> Any:
    """Read-only copy of parsed JSON, so the cached table cannot be changed by a caller."""
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


@lru_cache(maxsize=1)
def load_spec() -> Mapping[str, Any]:
    """The parsed, read-only `families.json` (grid defaults and family entries)."""
    text = (resources.files(__package__) / "data" / "families.json").read_text("utf-8")
    spec: Mapping[str, Any] = _freeze(json.loads(text))
    return spec


def _axis(where: str, config: Mapping[str, Any], default_points: int) -> Axis:
    if "values" in config:
        return Axis(values=tuple(float(v) for v in config["values"]))
    spacing = config.get("spacing", "linspace")
    if spacing not in ("linspace", "logspace"):
        raise ValueError(f"{where}: spacing must be 'linspace' or 'logspace', got {spacing!r}")
    num = int(config.get("num_points", default_points))
    return Axis(
        low=float(config["min"]), high=float(config["max"]), num_points=num, spacing=spacing
    )


def _grid(entry: Mapping[str, Any], kind: str, defaults: Mapping[str, Any]) -> Grid:
    config, axes = entry[kind], entry["grid_axes"]
    if config is None:
        raise ValueError(
            f"families.json: {entry['id']} ({entry['split_role']}) needs a {kind} grid"
        )
    per_axis = (
        defaults["linspace_points_1d"]
        if len(axes) == 1
        else defaults["linspace_points_2d_per_axis"]
    )
    where = f"families.json: {entry['id']}.{kind}"
    return Grid(
        axes=tuple((name, _axis(f"{where}.{name}", config[name], per_axis)) for name in axes),
        max_specs=int(config.get("max_specs", defaults[f"{kind}_max_specs_per_family"])),
    )


# Every key an entry may have: a key the code does not read is an error, not a silent setting.
_ENTRY_KEYS = frozenset(
    ("id", "display_name", "tier", "integer_only", "params", "grid_axes", "scipy_name")
    + ("split_role", "train", "test_unseen", "test_selected", "ood", "ood_selected")
)


def _family(entry: Mapping[str, Any], defaults: Mapping[str, Any]) -> Family:
    family_id, role = entry["id"], entry["split_role"]
    if unknown := sorted(set(entry) - _ENTRY_KEYS):
        raise ValueError(f"families.json: {family_id} has keys calibft does not read: {unknown}")
    if family_id not in _LAWS:
        raise ValueError(f"families.json: {family_id} has no entry in distributions._LAWS")
    if role not in SPLIT_ROLES:
        raise ValueError(f"families.json: {family_id}.split_role must be one of {SPLIT_ROLES}")
    law = _LAWS[family_id]
    if tuple(law.ranges) != tuple(entry["params"]):
        raise ValueError(f"families.json: {family_id}.params differ from its _LAWS ranges")
    return Family(
        id=family_id,
        display_name=entry["display_name"],
        tier=entry["tier"],
        integer_only=entry["integer_only"],
        params=tuple(entry["params"]),
        grid_axes=tuple(entry["grid_axes"]),
        scipy_name=entry["scipy_name"],
        split_role=role,
        grids=MappingProxyType({kind: _grid(entry, kind, defaults) for kind in GRID_KINDS[role]}),
        selected=tuple(
            MappingProxyType({k: float(v) for k, v in row.items()})
            for row in entry[SELECTED_KIND[role]]
        ),
        law=law,
    )


@lru_cache(maxsize=1)
def _family_index() -> Mapping[str, Family]:
    spec = load_spec()
    index = {entry["id"]: _family(entry, spec["grid_defaults"]) for entry in spec["families"]}
    if missing := set(_LAWS) - set(index):
        raise ValueError(f"distributions._LAWS has families missing in families.json: {missing}")
    return MappingProxyType(index)


def families(split_role: str | None = None) -> list[Family]:
    """All families in `families.json` order, or those of one split role."""
    if split_role is not None and split_role not in SPLIT_ROLES:
        raise ValueError(f"split_role must be one of {', '.join(SPLIT_ROLES)}, got {split_role!r}")
    return [f for f in _family_index().values() if split_role in (None, f.split_role)]


def get_family(family_id: str) -> Family:
    """The family with this id; ValueError listing the valid ids otherwise."""
    index = _family_index()
    if family_id not in index:
        raise ValueError(f"unknown family {family_id!r}; valid ids: {', '.join(index)}")
    return index[family_id]


def is_integer_family(family_id: str) -> bool:
    """Whether the family's samples are integers (its output space is every integer in range)."""
    return get_family(family_id).integer_only


def quantile_levels() -> tuple[float, float]:
    """The levels whose quantiles bound a law's output space (docs/method.md §4)."""
    defaults = load_spec()["grid_defaults"]
    return float(defaults["quantile_low"]), float(defaults["quantile_high"])


# ---------------------------------------------------------------------------------------------
# Parameters, laws and prompts


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
    law = family.law
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


def _scipy(family_id: str, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The family's `scipy.stats` distribution and its keyword arguments for validated
    parameters, each a float or a column of them (`frozen_law_batch`)."""
    from scipy import stats  # here, not at import: the registry and splits do without SciPy

    family = get_family(family_id)
    return getattr(stats, family.scipy_name), family.law.args(params)


def _build(family_id: str, params: Mapping[str, Any]) -> Any:
    dist, args = _scipy(family_id, params)
    return dist(**args)


def frozen_law(family_id: str, params: Params) -> Any:
    """The exact frozen `scipy.stats` distribution of the family (SciPy is the ground truth)."""
    return _build(family_id, validate_params(family_id, params))  # also rejects unknown ids


def frozen_law_batch(family_id: str, params_list: Sequence[Params]) -> Any:
    """One frozen `scipy.stats` law over k parameter sets, its parameters columns of shape [k, 1]:
    ``law.ppf(levels[None, :])`` gives k rows at once (one SciPy call instead of k)."""
    if not params_list:
        raise ValueError("frozen_law_batch needs at least one parameter set")
    checked = [validate_params(family_id, params) for params in params_list]
    columns = {name: np.array([c[name] for c in checked])[:, None] for name in checked[0]}
    return _build(family_id, columns)


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
        from scipy import stats  # loaded already: `law` is a SciPy law

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
        f"cannot invert the CDF of {law.dist.name}{law.kwds} "
        f"at levels {levels.min()}..{levels.max()}"
    )


def support(family_id: str, params: Params) -> tuple[float, float]:
    """Support bounds (lo, hi) of docs/method.md §2 as floats; unbounded sides are +-inf.

    They are SciPy's (`frozen_law(...).support()`, asked of the unfrozen distribution: freezing
    costs a millisecond), which equal the table's formulas exactly on every grid and selected row
    (tests/test_distributions.py)."""
    dist, args = _scipy(family_id, validate_params(family_id, params))
    lo, hi = dist.support(**args)
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
