"""Wasserstein-1 scoring (SPEC §8): sample W1 against the SciPy law, and exact discrete W1."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibft import _core
from calibft.distributions import frozen_law


def _valid_samples(samples: Any) -> np.ndarray:
    x = np.ascontiguousarray(samples, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError("samples must not contain NaN: pass only the valid (parsed) values")
    return x


def _law_quantiles(law: Any, n: int) -> np.ndarray:
    return np.ascontiguousarray(law.ppf((np.arange(n) + 0.5) / n), dtype=np.float64)


def _spread(law: Any) -> float:
    """Q95 − Q05; NaN when degenerate (a law that puts 90% on one point has no usable scale)."""
    spread = float(law.ppf(0.95) - law.ppf(0.05))
    return spread if spread > 0 else float("nan")


def w1_scale(family: str, params: Mapping[str, float]) -> float:
    """The normalizer of normalized W1: Q95 − Q05 of the law (NaN when degenerate)."""
    return _spread(frozen_law(family, params))


def w1(samples: Any, family: str, params: Mapping[str, float], normalized: bool = False) -> float:
    """W1 between valid samples and the law; NaN without samples. `normalized` divides by Q95−Q05."""
    x = _valid_samples(samples)
    law = frozen_law(family, params)
    if x.size == 0:
        return float("nan")
    value = _core.sample_w1(x, _law_quantiles(law, x.size))
    return value / _spread(law) if normalized else value


def w1_batch(
    samples: Sequence[Any],
    specs: Sequence[Any],
    normalized: bool = False,
) -> np.ndarray:
    """`w1` for many prompts; `specs[j]` is a `(family, params)` pair or has `.family`/`.params`."""
    if len(samples) != len(specs):
        raise ValueError(f"need one spec per sample set: {len(samples)} sample sets, {len(specs)} specs")
    arrays = [_valid_samples(s) for s in samples]
    laws = [frozen_law(*_pair(spec)) for spec in specs]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    quantiles = np.concatenate([_law_quantiles(law, a.size) for law, a in zip(laws, arrays)] or [np.zeros(0)])
    out = _core.sample_w1_batch(offsets, flat, quantiles)
    if normalized:
        out /= np.array([_spread(law) for law in laws])
    return out


def discrete_w1(numeric_values: Any, p: Any, q: Any) -> float:
    """Exact W1 between distributions `p` and `q` on one sorted numeric support.

    `p` and `q` are masses (finite, non-negative, positive total); each is normalized to sum 1,
    as `scipy.stats.wasserstein_distance` does with weights."""
    x = np.ascontiguousarray(numeric_values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("numeric_values must be finite")
    masses = []
    for name, weights in (("p", p), ("q", q)):
        w = np.ascontiguousarray(weights, dtype=np.float64)
        total = float(w.sum())
        if not (np.isfinite(w).all() and (w >= 0).all() and 0 < total < math.inf):
            raise ValueError(f"{name} must be finite, non-negative masses with a positive total")
        masses.append(w / total)
    return _core.discrete_w1(x, *masses)


def _pair(spec: Any) -> tuple[str, Mapping[str, float]]:
    return (spec[0], spec[1]) if isinstance(spec, tuple) else (spec.family, spec.params)
