"""Type stubs of the Rust core (rust/python.rs), exposed as ``calibft._core``.

Arrays come back with fixed dtypes: int64 offsets, int32 token ids, float64 probabilities.
Every error the core reports is a ``CalibftError`` (a ``ValueError``) whose message names the
offending field. ``tests/test_stubs.py`` checks that these stubs name exactly what the module
exports, so keep them in step with the bindings.
"""

from collections.abc import Sequence
from typing import Final, final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CalibftError",
    "MAX_DECIMALS",
    "MAX_BINS_LIMIT",
    "OutputSpace",
    "CompletionTokenizer",
    "Trie",
    "continuous_edges",
    "continuous_space",
    "integer_values",
    "integer_space",
    "space_from_parts",
    "build_trie",
    "build_tries",
    "build_trie_from_ids",
    "sample_w1",
    "sample_w1_batch",
    "discrete_w1",
]

MAX_DECIMALS: Final[int]
"""Largest ``decimals`` a continuous grid accepts."""
MAX_BINS_LIMIT: Final[int]
"""Largest ``max_bins`` a grid accepts."""

class CalibftError(ValueError):
    """Invalid input to the calibft core."""

@final
class OutputSpace:
    """A target distribution over canonical strings: a discretized law (numeric order) or a
    weighted list of arbitrary strings (the order they were given in)."""

    @property
    def values(self) -> list[str]:
        """The canonical strings: numbers in increasing order, or the given strings."""
    @property
    def numeric(self) -> NDArray[np.float64] | None:
        """The values parsed as numbers; None for a space of arbitrary strings."""
    @property
    def probs(self) -> NDArray[np.float64]:
        """The masses of the values (they sum to 1)."""
    @property
    def lower(self) -> float | None:
        """Lower end of the discretized range; None for a space of arbitrary strings."""
    @property
    def upper(self) -> float | None:
        """Upper end of the discretized range; None for a space of arbitrary strings."""
    @property
    def decimals(self) -> int | None:
        """Decimals of a continuous space; None for integer and string spaces."""
    def __len__(self) -> int: ...

@final
class CompletionTokenizer:
    """Tokenizes canonical strings as a model's completion (terminator appended), in Rust."""

    def __new__(cls, tokenizer_json: str, end_token_id: int) -> CompletionTokenizer:
        """``tokenizer_json``: a fast tokenizer's serialized JSON; ``end_token_id``: the
        terminator appended to every completion (must lie inside the vocabulary)."""
    @property
    def end_token_id(self) -> int:
        """The terminator appended to every completion."""
    def encode_values(
        self, context: str, values: Sequence[str]
    ) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
        """(offsets int64[n+1], ids int32) of each value's completion tokens after ``context``,
        terminator included: value ``i`` owns ``ids[offsets[i]:offsets[i+1]]``."""

@final
class Trie:
    """A prefix trie of completion token sequences, in CSR form (nodes numbered breadth-first)."""

    @property
    def num_nodes(self) -> int:
        """Number of nodes, root included."""
    @property
    def num_values(self) -> int:
        """Number of values (token sequences) inserted."""
    @property
    def nbytes(self) -> int:
        """Heap bytes held by the trie."""
    @property
    def node_offsets(self) -> NDArray[np.int64]:
        """int64[num_nodes + 1]: node ``u``'s children are edges
        ``node_offsets[u]:node_offsets[u+1]``."""
    @property
    def child_tokens(self) -> NDArray[np.int32]:
        """int32[num_edges]: each edge's token; sorted within a node."""
    @property
    def child_probs(self) -> NDArray[np.float64]:
        """float64[num_edges]: q(token | node); each internal node's children sum to 1."""
    @property
    def child_nodes(self) -> NDArray[np.int32]:
        """int32[num_edges]: the node each edge leads to (edge ``e`` leads to node ``e + 1``)."""
    @property
    def value_probs(self) -> NDArray[np.float64]:
        """float64[num_values]: each value's mass, the product of q along its path."""
    def parents(self) -> NDArray[np.int32]:
        """int32[num_nodes]: each node's parent (the root is its own parent)."""
    def depths(self) -> NDArray[np.int32]:
        """int32[num_nodes]: each node's depth (root 0)."""
    def layout(
        self,
    ) -> tuple[
        NDArray[np.int64],
        NDArray[np.int64],
        NDArray[np.int64],
        NDArray[np.int64],
        NDArray[np.int64],
    ]:
        """(preorder int64[num_nodes], parent int64[num_nodes] (-1 at the root), depth
        int64[num_nodes], value_offsets int64[num_values+1], value_edges int64): depth-first
        pre-order (children in edge order), and the edges along each value's path, root first."""
    def value_paths(self) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
        """(offsets int64[num_values+1], ids int32): each value's token path, terminator
        included."""
    def sample_paths(
        self, n: int, seed: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int32]]:
        """(value indices int64[n], offsets int64[n+1], ids int32): ``n`` values drawn i.i.d.
        from the masses, reproducibly from ``seed``, with their token paths."""
    def targets_along(
        self, ids: NDArray[np.int32]
    ) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float64]]:
        """(offsets int64[len(ids)+1], tokens int32, probs float64): q(· | ids[:k]) at every
        position ``k`` of a root path; a path leaving the trie raises CalibftError."""

def continuous_edges(
    lower: float, upper: float, decimals: int, max_bins: int
) -> NDArray[np.float64]:
    """Bin edges of the continuous grid on [lower, upper] (docs/method.md §4, steps 2-4)."""

def continuous_space(
    lower: float,
    upper: float,
    decimals: int,
    max_bins: int,
    cdf_at_edges: NDArray[np.float64],
) -> OutputSpace:
    """A continuous output space from the law's CDF at ``continuous_edges(...)``."""

def integer_values(lower: float, upper: float, max_bins: int) -> NDArray[np.int64]:
    """The integers of an integer space: lower..upper, at most ``max_bins`` of them."""

def integer_space(
    values: NDArray[np.int64], pmf: NDArray[np.float64], upper_tail: float
) -> OutputSpace:
    """An integer output space; ``upper_tail`` is added to the last value's mass."""

def space_from_parts(values: Sequence[str], masses: NDArray[np.float64]) -> OutputSpace:
    """A space of arbitrary strings (never parsed) with the given masses, normalized to sum 1;
    the strings must be non-empty and distinct, the masses finite, non-negative, not all zero."""

def build_trie(space: OutputSpace, tokenizer: CompletionTokenizer, context: str) -> Trie:
    """The trie of ``space``'s completions after ``context`` (the chat prefix's tail)."""

def build_tries(
    spaces: Sequence[OutputSpace], tokenizer: CompletionTokenizer, contexts: Sequence[str]
) -> list[Trie]:
    """One trie per space (space ``i`` completing ``contexts[i]``), built in parallel."""

def build_trie_from_ids(
    offsets: NDArray[np.int64], ids: NDArray[np.int32], masses: NDArray[np.float64]
) -> Trie:
    """A trie from pre-tokenized values: value ``i`` is ``ids[offsets[i]:offsets[i+1]]``
    (terminator included; sequences must be prefix-free)."""

def sample_w1(samples: NDArray[np.float64], quantiles: NDArray[np.float64]) -> float:
    """W1 of samples against the law's quantiles at (i − 0.5)/N: (1/N) Σ |x_(i) − Q_i| over
    finite terms; NaN without samples."""

def sample_w1_batch(
    offsets: NDArray[np.int64], samples: NDArray[np.float64], quantiles: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``sample_w1`` per prompt; prompt ``j`` owns ``offsets[j]:offsets[j+1]`` of both arrays."""

def discrete_w1(x: NDArray[np.float64], p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    """Exact W1 between distributions ``p`` and ``q`` on the sorted support ``x``."""
