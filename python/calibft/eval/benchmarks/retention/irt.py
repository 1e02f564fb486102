"""tinyBenchmarks' performance estimators (IRT, p-IRT, gp-IRT) and a safe reader of their
parameter file (docs/benchmarks/retention.md §5).

The parameters come from the upstream ``tinyBenchmarks.pkl`` (MIT, Felipe Maia Polo), a pickle.
Unpickling runs whatever callables a file names, so `load_irt_file` admits only the few numpy
constructors that arrays and scalars need and refuses any other global before calling it.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IRT_URL = "https://raw.githubusercontent.com/felipemaiapolo/tinyBenchmarks/main/tinyBenchmarks/tinyBenchmarks.pkl"
ANCHORS = 100  # items per tiny dataset, hence anchor points per scenario
BUNDLE_KEYS = (
    "seen_examples",
    "examples_weights",
    "irt_parameters",
    "optimal_lambdas",
    "scenarios_position",
    "subscenarios_position",
)
_EPS = 1e-10  # keeps log() finite at P = 0 or 1, as upstream
_CLIP = 30.0  # bound of each dimension's logit term, as upstream


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a parameter file never holds."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Pickle protocol 2 stores bytes as ``_codecs.encode(text, 'latin1')``; nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused("it calls _codecs.encode for something else than latin-1 bytes")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy arrays, dtypes and scalars pickle to, under numpy 1 and 2 module names
    (a numpy 1 file names ``numpy.core``, which numpy 2 still answers, with a warning)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]  # protocol 5; private, not in numpy's stubs
    return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
    """Plain containers, strings and numbers (pickle opcodes, no globals) plus numpy arrays and
    scalars; any other global is refused before it is called."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"it names {module}.{name}, which a parameter file never needs")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it refers to persistent objects")


def load_irt_file(path: str | Path) -> dict[str, Any]:
    """The unpickled parameter dict of ``tinyBenchmarks.pkl``, read without running code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(
            f"cannot read the IRT file {str(path)!r} ({err.strerror}); download {IRT_URL}"
        ) from None
    try:
        params = _DataOnlyUnpickler(io.BytesIO(data)).load()
    except _Refused as err:
        raise ValueError(
            f"IRT file {str(path)!r} refused: {err}; use the upstream file from {IRT_URL}"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(
            f"IRT file {str(path)!r} is not a readable pickle ({err}); download {IRT_URL}"
        ) from None
    if not isinstance(params, dict):
        raise ValueError(
            f"IRT file {str(path)!r} holds a {type(params).__name__}, "
            "not the upstream dict of bundles"
        )
    return params


def check_irt(
    params: Mapping[str, Any], needs: Mapping[str, Sequence[str]], path: str | Path
) -> None:
    """ValueError (naming `path`) unless every bundle in `needs` has the upstream structure and
    every scenario listed for it can be estimated."""
    where = f"IRT file {str(path)!r}"
    for bundle, scenarios in needs.items():
        part = params.get(bundle)
        if not isinstance(part, Mapping):
            raise ValueError(
                f"{where} has no bundle {bundle!r} (bundles: {', '.join(map(str, params))})"
            )
        missing = [k for k in BUNDLE_KEYS if k not in part]
        if missing:
            raise ValueError(f"{where}: bundle {bundle!r} lacks {', '.join(missing)}")
        for key in BUNDLE_KEYS[1:]:
            if not isinstance(part[key], Mapping):
                raise ValueError(
                    f"{where}: bundle {bundle!r} field {key} is a "
                    f"{type(part[key]).__name__}, not a dict"
                )
        try:
            _check_bundle(part, bundle, scenarios, where)
        except (TypeError, KeyError, IndexError, AttributeError) as err:
            raise ValueError(
                f"{where}: bundle {bundle!r} has an unexpected structure ({err!r})"
            ) from None


def _check_bundle(
    part: Mapping[str, Any], bundle: str, scenarios: Sequence[str], where: str
) -> None:
    """`check_irt` for one bundle whose fields are present and of the right kinds."""
    irt = part["irt_parameters"]
    a, b = (np.asarray(irt.get(k)) if isinstance(irt, Mapping) else None for k in ("A", "B"))
    if a is None or b is None or a.ndim != 3 or a.shape != b.shape or a.shape[0] != 1:
        raise ValueError(
            f"{where}: bundle {bundle!r} needs irt_parameters A and B of one shape (1, D, N)"
        )
    positions = part["scenarios_position"]
    pool = 1 + max(int(np.max(v)) for v in positions.values())
    if a.shape[2] < pool:
        raise ValueError(
            f"{where}: bundle {bundle!r} has parameters for {a.shape[2]} items, "
            f"its scenarios {pool}"
        )
    for scenario in scenarios:
        name = _resolve_scenario(part, bundle, scenario, where)
        seen = _seen_items(part, name, bundle, where)
        weights = np.asarray(part["examples_weights"].get(name, ()))
        in_scenario = np.isin(seen, np.asarray(positions[name])).sum()
        if weights.shape != (in_scenario,):
            raise ValueError(
                f"{where}: bundle {bundle!r} scenario {name!r} has {weights.size} anchor weights "
                f"for {in_scenario} anchor items"
            )
        for key in ("optimal_lambdas", "subscenarios_position"):
            if name not in part[key]:
                raise ValueError(f"{where}: bundle {bundle!r} has no {key} for scenario {name!r}")


def _resolve_scenario(part: Mapping[str, Any], bundle: str, scenario: str, where: str) -> str:
    """`scenario` if the bundle has it; else its only scenario (upstream's rule for one-scenario
    bundles such as mmlu)."""
    names = list(part["scenarios_position"])
    if scenario in names:
        return scenario
    if len(names) == 1:
        return str(names[0])
    raise ValueError(
        f"{where}: bundle {bundle!r} has no scenario {scenario!r} (scenarios: {', '.join(names)})"
    )


def _seen_items(part: Mapping[str, Any], scenario: str, bundle: str, where: str) -> np.ndarray:
    """The anchor items of `scenario`'s tiny dataset, in dataset order: all of a bundle's anchors
    when it has 100, else the scenario's 100-slice (slices follow the scenario order)."""
    seen = np.asarray(part["seen_examples"]).astype(np.int64).ravel()
    names = list(part["scenarios_position"])
    if len(seen) == ANCHORS:
        return seen
    if len(seen) == ANCHORS * len(names):
        offset = ANCHORS * names.index(scenario)
        return seen[offset : offset + ANCHORS]
    raise ValueError(
        f"{where}: bundle {bundle!r} has {len(seen)} anchor items; expected 100 or 100 per scenario"
    )


def item_curve(theta: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(correct) of items with parameters a, b [1, D, n] for ability theta [1, D, 1]; each
    dimension's logit term is clipped before the sum."""
    z = np.clip(a * theta - b, -_CLIP, _CLIP).sum(axis=1)
    return 1.0 / (1.0 + np.exp(-z))


def fit_ability(
    responses: np.ndarray, seen: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """The ability [D] maximizing the Bernoulli likelihood of the responses on the seen items
    (continuous responses in [0, 1] allowed): BFGS from 0, default tolerances, numerical
    gradient."""
    from scipy.optimize import minimize

    dims = a.shape[1]
    a_seen, b_seen, r = a[:, :, seen], b[:, :, seen], responses[seen]

    def negative_log_likelihood(theta: np.ndarray) -> float:
        p = item_curve(theta.reshape(1, dims, 1), a_seen, b_seen)[0]
        return float(-np.sum(r * np.log(p + _EPS) + (1 - r) * np.log(1 - p + _EPS)))

    return np.asarray(minimize(negative_log_likelihood, np.zeros(dims), method="BFGS").x)


def balance_weights(part: Mapping[str, Any], pool: int) -> np.ndarray:
    """Per pool item, the weight that makes each subscenario count equally in its scenario:
    N_s / (n_sub * n_u) for an item of subscenario u; 1 for items in none."""
    weights = np.ones(pool)
    for scenario, items in part["scenarios_position"].items():
        subs = part["subscenarios_position"][scenario]
        for members in subs.values():
            weights[np.asarray(members, dtype=np.int64)] = len(items) / (len(subs) * len(members))
    return weights


def gp_irt(
    scores: Sequence[float], irt: Mapping[str, Any], *, bundle: str, scenario: str
) -> dict[str, float]:
    """IRT, p-IRT and gp-IRT estimates of a full-benchmark score from the 100 item scores of a
    tiny dataset (dataset order; 0/1, or TruthfulQA's continuous mc2 value)."""
    y = np.asarray(scores, dtype=np.float64)
    if y.shape != (ANCHORS,):
        raise ValueError(f"gp-IRT needs exactly {ANCHORS} item scores, got {y.size}")
    where = "IRT parameters"
    part = irt[bundle]
    name = _resolve_scenario(part, bundle, scenario, where)
    seen = _seen_items(part, name, bundle, where)
    positions = part["scenarios_position"]
    pool = 1 + max(int(np.max(v)) for v in positions.values())
    a = np.asarray(part["irt_parameters"]["A"], dtype=np.float64)
    b = np.asarray(part["irt_parameters"]["B"], dtype=np.float64)
    responses = np.zeros(pool)
    responses[seen] = y
    theta = fit_ability(responses, seen, a, b)

    members = np.asarray(positions[name], dtype=np.int64)
    seen_here = seen[np.isin(seen, members)]  # in anchor order, as the anchor weights are
    unseen_here = np.setdiff1d(members, seen)
    weights = balance_weights(part, pool)
    estimate_irt = float(
        np.sum(np.asarray(part["examples_weights"][name], dtype=np.float64) * responses[seen_here])
    )
    lam = ANCHORS / len(members)
    observed = float(np.mean(weights[seen_here] * responses[seen_here]))
    pirt = lam * observed
    if len(unseen_here):  # a scenario made only of anchors has no predicted part
        predicted = item_curve(theta.reshape(1, -1, 1), a[:, :, unseen_here], b[:, :, unseen_here])[
            0
        ]
        pirt += (1 - lam) * float(np.mean(weights[unseen_here] * predicted))
    best = float(part["optimal_lambdas"][name])
    return {"irt": estimate_irt, "pirt": pirt, "gpirt": best * estimate_irt + (1 - best) * pirt}
