"""A slow, obviously-correct reference of docs/method.md §4 (output spaces) and §5 (trie targets).

Written straight from the spec text with NumPy/SciPy and plain Python containers; used only as a
test oracle for the Rust core. It shares nothing with calibft's implementation except the family
registry (`frozen_law`, `support`), which docs/method.md §2 names as the ground truth for every law.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from calibft.distributions import frozen_law, get_family, support

Q_LO = 0.001
Q_HI = 0.999


def clip_and_normalize(masses: np.ndarray) -> np.ndarray:
    masses = np.clip(np.asarray(masses, dtype=np.float64), 0.0, None)
    total = masses.sum()
    if not total > 0:
        raise ValueError("all-zero masses")
    return masses / total


def continuous_centers(lower: float, upper: float, decimals: int, max_bins: int) -> np.ndarray:
    """docs/method.md §4 continuous steps 2-3: the decimal lattice, evenly subsampled to
    `max_bins`."""
    step = 10.0**-decimals
    k_lo = math.ceil(lower / step)
    k_hi = math.floor(upper / step)
    if k_lo > k_hi:
        return np.array([round((lower + upper) / 2, decimals)])
    n = k_hi - k_lo + 1
    # Index the lattice instead of materializing it: n can be astronomically large.
    idx = np.arange(n) if n <= max_bins else np.linspace(0, n - 1, max_bins, dtype=int)
    return (k_lo + idx.astype(np.int64)).astype(np.float64) * step


def reference_space(
    family: str, params: Mapping[str, float], decimals: int = 5, max_bins: int = 1001
) -> tuple[list[str], np.ndarray]:
    """(canonical strings, masses) of `family(params)` exactly as docs/method.md §4 describes."""
    law = frozen_law(family, params)
    lo_s, hi_s = support(family, params)
    if get_family(family).integer_only:
        return _integer_space(law, lo_s, hi_s, max_bins)
    return _continuous_space(law, lo_s, hi_s, decimals, max_bins)


def _continuous_space(law, lo_s, hi_s, decimals, max_bins):
    lower = max(float(law.ppf(Q_LO)), lo_s)
    upper = min(float(law.ppf(Q_HI)), hi_s)
    if not (math.isfinite(lower) and math.isfinite(upper)) or lower >= upper:
        lower, upper = -10.0, 10.0
    centers = continuous_centers(lower, upper, decimals, max_bins)
    edges = np.concatenate([[lower], (centers[:-1] + centers[1:]) / 2, [upper]])
    cdf = law.cdf(edges)
    masses = np.diff(cdf)
    masses[0] += cdf[0]
    masses[-1] += 1.0 - cdf[-1]
    masses = clip_and_normalize(masses)
    values: list[str] = []
    merged: list[float] = []
    for center, mass in zip(centers, masses):
        text = f"{center:.{decimals}f}"
        if values and values[-1] == text:
            merged[-1] += mass
        else:
            values.append(text)
            merged.append(mass)
    return values, clip_and_normalize(np.array(merged))


def _integer_space(law, lo_s, hi_s, max_bins):
    if math.isfinite(lo_s):
        lower = int(lo_s)
    else:
        q = float(law.ppf(Q_LO))
        lower = math.floor(q) if math.isfinite(q) else -max_bins // 2
    if math.isfinite(hi_s):
        upper = int(hi_s)
    else:
        q = float(law.ppf(Q_HI))
        upper = math.ceil(q) if math.isfinite(q) else max_bins // 2
    if lower > upper:
        lower, upper = upper, lower
    ints = list(range(lower, upper + 1))[:max_bins]
    masses = np.asarray(law.pmf(np.array(ints, dtype=np.float64)), dtype=np.float64)
    if not math.isfinite(hi_s):
        masses[-1] += 1.0 - float(law.cdf(ints[-1]))
    return [str(k) for k in ints], clip_and_normalize(masses)


class ReferenceTrie:
    """docs/method.md §5 with dictionaries: mass of every token prefix, and q(v | p) as a ratio of
    masses."""

    def __init__(self, sequences: Sequence[Sequence[int]], masses: Sequence[float]) -> None:
        self.prefix_mass: dict[tuple[int, ...], float] = defaultdict(float)
        self.children: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for seq, mass in zip(sequences, masses):
            seq = tuple(int(t) for t in seq)
            for k in range(len(seq) + 1):
                self.prefix_mass[seq[:k]] += float(mass)
                if k < len(seq):
                    self.children[seq[:k]].add(seq[k])

    def targets(self, prefix: Sequence[int]) -> dict[int, float]:
        """q(· | prefix): mass of the strings extending prefix·v over the mass extending prefix."""
        prefix = tuple(int(t) for t in prefix)
        total = self.prefix_mass[prefix]
        return {v: self.prefix_mass[prefix + (v,)] / total for v in sorted(self.children[prefix])}
