"""The structured benchmark's exact-pass metrics from known distributions, and its display
histogram."""

import math

import numpy as np
import pytest
from scipy import stats

from calibft.eval.benchmarks.structured.exact import exact_metrics, histogram_of


def test_exact_metrics_of_known_distributions() -> None:
    class Space:
        family, params = "poisson", {"lambda": 2.0}
        numeric = np.arange(0.0, 5.0)
        probs = np.array([0.1, 0.2, 0.4, 0.2, 0.1])

    perfect = exact_metrics(Space, np.log(Space.probs))
    assert perfect.valid_mass == pytest.approx(1.0)
    assert perfect.w1 == pytest.approx(0.0, abs=1e-12)
    assert perfect.sequence_kl == pytest.approx(0.0, abs=1e-12)
    half = exact_metrics(Space, np.log(Space.probs / 2))  # half the mass off the canonical outputs
    assert half.valid_mass == pytest.approx(0.5)
    assert half.w1 == pytest.approx(0.0, abs=1e-12)  # W1 is taken after renormalization
    assert half.sequence_kl == pytest.approx(math.log(2))
    shifted = exact_metrics(Space, np.log([1e-12, 0.1, 0.2, 0.4, 0.3]))  # one step right, mostly
    assert shifted.w1 == pytest.approx(0.9, abs=1e-6)
    law = stats.poisson(2.0)
    assert shifted.normalized_w1 == pytest.approx(shifted.w1 / (law.ppf(0.95) - law.ppf(0.05)))


class _Space:
    def __init__(self, numeric, integer):
        self.numeric = np.asarray(numeric, dtype=float)
        self.integer = integer


def test_histogram_keeps_mass() -> None:
    space = _Space(np.linspace(-2, 2, 1001), integer=False)
    probs = np.full(1001, 0.5 / 1001)
    hist = histogram_of(space, probs)
    assert len(hist["edges"]) == len(hist["mass"]) + 1
    assert math.isclose(sum(hist["mass"]), 0.5)
    ints = histogram_of(_Space(np.arange(0, 5), integer=True), np.array([0.1, 0.2, 0.3, 0.2, 0.1]))
    assert ints["mass"] == pytest.approx([0.1, 0.2, 0.3, 0.2, 0.1])
    assert ints["edges"][0] == -0.5
