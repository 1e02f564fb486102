"""The structured benchmark's exact pass: the model's exact, sampling-free distribution over a
prompt's canonical outputs (one tree-attention pass over the trie, `LM.trie_logprobs`), and the
metrics derived from it: the mass the model puts on canonical outputs, the exact W1 between the
model's renormalized distribution and the target, and the exact sequence-level KL(target ||
model). Optionally (``tolerance`` > 0) the trie is expanded most probable prefixes first and the
pass stops early, with a reported bound on the mass it leaves unresolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from calibft.eval.metrics import discrete_w1, w1_scale
from calibft.lm.layout import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from calibft.lm import LM, PromptState
    from calibft.lm.layout import TrieLayout

DISPLAY_BINS = 80
"""Bins of a continuous space's stored histogram (integer spaces get one bin per value)."""

PRUNING_FLOORS = (1e-4, 1e-6, 1e-8, 1e-10, 0.0)
"""Prefix-probability floors of the pruned trie walk's successive rounds (see `exact_distribution`);
the last round expands whatever is left."""


@dataclass(frozen=True)
class ExactResult:
    """The model's exact distribution over one output space and the metrics derived from it.

    With a positive ``tolerance`` the strings under unexpanded trie nodes get probability 0
    here, and their true total is at most ``unresolved_mass``: ``valid_mass`` is then a lower
    bound, exceeded by at most ``unresolved_mass``.
    """

    probs: np.ndarray  # float64 [M]: model probability of each canonical string (space order)
    valid_mass: float  # sum of probs: mass on canonical outputs
    w1: float  # W1(model renormalized on the space, target); nan if valid_mass == 0
    normalized_w1: float  # w1 / (Q95 - Q05) of the SciPy law
    sequence_kl: float  # KL(target || model) over canonical strings, nats (inf if the model
    # gives zero probability to a string of positive target mass; nan if such a string was
    # left unresolved)
    unresolved_mass: float = 0.0  # model mass under unexpanded nodes (0 when all are scored)


def exact_metrics(space: Any, logprobs: np.ndarray, unresolved_mass: float = 0.0) -> ExactResult:
    """Exact metrics from the model's log-probability of every canonical string of `space`
    (NaN for strings left unresolved)."""
    resolved = ~np.isnan(logprobs)
    probs = np.where(resolved, np.exp(np.where(resolved, logprobs, 0.0)), 0.0)
    mass = float(probs.sum())
    target = np.asarray(space.probs, dtype=np.float64)
    if mass > 0 and math.isfinite(mass):
        w1 = float(discrete_w1(np.asarray(space.numeric, dtype=np.float64), probs / mass, target))
    else:
        w1 = math.nan
    support = target > 0
    if resolved[support].all():
        kl = float(np.sum(target[support] * (np.log(target[support]) - logprobs[support])))
    else:
        kl = math.nan
    return ExactResult(
        probs=probs,
        valid_mass=mass,
        w1=w1,
        normalized_w1=w1 / w1_scale(space.family, space.params),
        sequence_kl=kl,
        unresolved_mass=unresolved_mass,
    )


def _expand(
    lm: LM,
    state: PromptState,
    layout: TrieLayout,
    frontier: np.ndarray,
    floor: float,
    edge_lp: np.ndarray,
    prefix_lp: np.ndarray,
    *,
    chunk_size: int,
) -> np.ndarray:
    """Score the internal nodes below `frontier` (whose log prefix probabilities `prefix_lp` holds)
    breadth-first, not expanding a node whose prefix the model gives less than `floor`. Fills
    `edge_lp` and `prefix_lp` in place; returns the nodes left unexpanded."""
    degree = np.diff(layout.offsets)
    log_floor = math.log(floor) if floor > 0 else -math.inf
    pending = []
    while frontier.size:
        keep = prefix_lp[frontier] >= log_floor
        pending.append(frontier[~keep])
        expand = frontier[keep]
        scored = lm.trie_logprobs(state, layout, expand, chunk_size=chunk_size)
        edges, counts = layout.edges_of(expand)
        edge_lp[edges] = scored[edges]
        children = layout.children[edges]
        prefix_lp[children] = np.repeat(prefix_lp[expand], counts) + edge_lp[edges]
        frontier = children[degree[children] > 0]
    return np.concatenate(pending) if pending else frontier


def exact_distribution(
    lm: LM,
    state: PromptState,
    space: Any,
    layout: TrieLayout,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tolerance: float = 0.0,
) -> ExactResult:
    """Teacher-force the trie of `space` and return the model's exact distribution on it.

    ``tolerance`` = 0 scores every internal node. Above 0 the trie is expanded in rounds, most
    probable prefixes first (nodes whose prefix has probability at least 1e-4, then 1e-6, …, see
    PRUNING_FLOORS), and stops once the probability of the prefixes still unexpanded — an upper
    bound on the canonical mass they could hold — is at most ``tolerance`` × the valid mass found.
    A model that concentrates its mass is then resolved from a small part of the trie; the bound
    is reported as ``unresolved_mass`` (exact W1 is then off by at most about
    2 · tolerance × the space's range).
    """
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < math.inf):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if tolerance == 0:
        edge_lp = lm.trie_logprobs(state, layout, chunk_size=chunk_size)
        return exact_metrics(space, layout.value_logprobs(edge_lp))
    edge_lp = np.full(len(layout.tokens), np.nan)
    prefix_lp = np.zeros(layout.num_nodes)
    pending = np.zeros(1, dtype=np.int64)  # the root
    for floor in PRUNING_FLOORS:
        pending = _expand(
            lm, state, layout, pending, floor, edge_lp, prefix_lp, chunk_size=chunk_size
        )
        logprobs = layout.value_logprobs(edge_lp)
        unresolved = float(np.exp(prefix_lp[pending]).sum())
        resolved = float(np.exp(logprobs[~np.isnan(logprobs)]).sum())
        if unresolved <= tolerance * resolved:
            break
    return exact_metrics(space, logprobs, unresolved)


def histogram_of(space: Any, probs: np.ndarray) -> dict[str, list[float]]:
    """The model's exact distribution over a space, summed into display bins (JSON-ready).

    Integer spaces keep one bin per value unless they have more than DISPLAY_BINS values.
    """
    numeric = np.asarray(space.numeric, dtype=np.float64)
    lo, hi = float(numeric.min()), float(numeric.max())
    if space.integer and len(numeric) <= DISPLAY_BINS:
        edges = np.arange(lo - 0.5, hi + 1.0)
    else:
        edges = np.linspace(lo, hi, DISPLAY_BINS + 1) if hi > lo else np.array([lo - 0.5, lo + 0.5])
    mass, _ = np.histogram(numeric, bins=edges, weights=probs)
    return {"edges": edges.tolist(), "mass": mass.tolist()}
