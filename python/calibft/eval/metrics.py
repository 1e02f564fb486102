"""Wasserstein-1 scoring (docs/benchmarks/structured.md §3): sample W1 against the SciPy law, and
exact discrete W1 (the structured benchmark and the public API use it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibft import _core
from calibft.distributions import frozen_law, frozen_law_batch, law_ppf
from calibft.targets.numeric import family_params


def _valid_samples(samples: Any) -> np.ndarray:
    x = np.ascontiguousarray(samples, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError("samples must not contain NaN: pass only the valid (parsed) values")
    return x


def _levels(n: int) -> np.ndarray:
    """The probability levels (i − ½)/n, i = 1..n, at which the structured benchmark's sample W1
    (docs/benchmarks/structured.md §3) reads the law."""
    return (np.arange(n) + 0.5) / n


def _spread(law: Any) -> np.ndarray:
    """Q95 − Q05 (one per parameter set of a batched law); NaN where degenerate (a law that puts
    90% on one point has no usable scale)."""
    spread = law_ppf(law, 0.95) - law_ppf(law, 0.05)
    return np.where(spread > 0, spread, np.nan)


def w1_scale(family: str, params: Mapping[str, float]) -> float:
    """The normalizer of normalized W1: Q95 − Q05 of the law (NaN when degenerate)."""
    return float(_spread(frozen_law(family, params)))


def w1(samples: Any, family: str, params: Mapping[str, float], normalized: bool = False) -> float:
    """W1 between valid samples and the law; NaN without samples. `normalized` divides by
    Q95−Q05."""
    return float(w1_batch([samples], [(family, params)], normalized=normalized)[0])


def w1_batch(
    samples: Sequence[Any] | np.ndarray,
    specs: Sequence[Any],
    normalized: bool = False,
) -> np.ndarray:
    """`w1` for many prompts; `specs[j]` is a `(family, params)` pair or has `.family`/`.params`.

    `samples` is one array of valid values per prompt, or a 2-D array with one row per prompt
    (then nothing is copied). The laws' quantiles come from one SciPy call per family and sample
    count, not one per prompt.
    """
    if isinstance(samples, np.ndarray) and samples.ndim == 2:
        flat = _valid_samples(samples)
        sizes = np.full(samples.shape[0], samples.shape[1], dtype=np.int64)
    else:
        arrays = [_valid_samples(s) for s in samples]
        flat = np.concatenate(arrays) if arrays else np.zeros(0)
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
    if len(sizes) != len(specs):
        raise ValueError(
            f"need one spec per sample set: {len(sizes)} sample sets, {len(specs)} specs"
        )
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    quantiles, spreads = _quantiles_and_spreads(
        [family_params(spec) for spec in specs], sizes, offsets
    )
    out = _core.sample_w1_batch(offsets, flat, quantiles)
    if normalized:
        out /= spreads
    return out


def _quantiles_and_spreads(
    pairs: Sequence[tuple[str, Mapping[str, float]]], sizes: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt's law quantiles at (i − ½)/n, flat like the samples, and its Q95 − Q05."""
    quantiles = np.empty(int(offsets[-1]))
    spreads = np.empty(len(pairs))
    groups: dict[tuple[str, int], list[int]] = {}
    for j, ((family, _), n) in enumerate(zip(pairs, sizes.tolist())):
        groups.setdefault((family, n), []).append(j)
    for (family, n), members in groups.items():
        law = frozen_law_batch(family, [pairs[j][1] for j in members])
        spreads[members] = _spread(law)[:, 0]
        if n:
            rows = law_ppf(law, _levels(n)[None, :])
            for row, j in zip(rows, members):
                quantiles[offsets[j] : offsets[j + 1]] = row
    return quantiles, spreads


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
