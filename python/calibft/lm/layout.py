"""The node-level arrays of a trie that a tree-attention pass walks (`calibft.lm.tree`).

The trie itself (CSR arrays, breadth-first node numbering: edge ``e`` leads to node ``e + 1``)
comes from the Rust core; `Trie.layout()` gives its depth-first pre-order, parents, depths and the
edges along every value's path in one call. Nothing here needs torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CHUNK_SIZE = 512
"""Trie nodes per packed forward pass: large enough for efficient matrix products, small enough
that the dense (chunk x (prompt + chunk)) attention mask stays cheap next to the MLPs."""


@dataclass(frozen=True)
class TrieLayout:
    """A trie's arrays as the tree pass uses them (all int64).

    ``order`` lists all nodes in DFS pre-order; in that order a node's ancestors come before it and
    every subtree is contiguous, which is what makes a contiguous chunk plus the first node's
    ancestors closed under "ancestor of".
    """

    offsets: np.ndarray  # [N+1]: node u's edges are offsets[u]:offsets[u+1]
    tokens: np.ndarray  # [E], the token on edge e
    children: np.ndarray  # [E], the node edge e leads to (e + 1)
    parent: np.ndarray  # [N], -1 at the root
    depth: np.ndarray  # [N]
    token_in: np.ndarray  # [N], token on the edge into the node (-1 at the root)
    order: np.ndarray  # [N], nodes in DFS pre-order
    value_offsets: np.ndarray  # [M+1]
    value_edges: np.ndarray  # [...], edges along each value's path, root to leaf

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def internal(self) -> np.ndarray:
        """Nodes with children (the positions whose next-token distribution matters), pre-order."""
        degree = np.diff(self.offsets)
        return self.order[degree[self.order] > 0]

    @classmethod
    def from_trie(cls, trie: Any) -> TrieLayout:
        """The layout of a `calibft.Trie`."""
        order, parent, depth, value_offsets, value_edges = trie.layout()
        offsets = np.asarray(trie.node_offsets, dtype=np.int64)
        tokens = np.asarray(trie.child_tokens, dtype=np.int64)
        children = np.arange(1, len(tokens) + 1, dtype=np.int64)
        token_in = np.concatenate([np.full(1, -1, dtype=np.int64), tokens])
        return cls(
            offsets, tokens, children, parent, depth, token_in, order, value_offsets, value_edges
        )

    def ancestors(self, node: int) -> list[int]:
        """Non-root ancestors of a node, root side first."""
        chain = []
        node = int(self.parent[node])
        while node > 0:
            chain.append(node)
            node = int(self.parent[node])
        return chain[::-1]

    def closure(self, nodes: np.ndarray) -> np.ndarray:
        """The nodes plus all their ancestors, in pre-order."""
        keep = np.zeros(self.num_nodes, dtype=bool)
        frontier = np.unique(np.asarray(nodes, dtype=np.int64))
        while frontier.size:
            frontier = frontier[~keep[frontier]]
            keep[frontier] = True
            frontier = self.parent[frontier]
            frontier = frontier[frontier >= 0]
        return self.order[keep[self.order]]

    def edges_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All outgoing edges of `nodes`, node by node, and each node's edge count."""
        starts = self.offsets[nodes]
        counts = self.offsets[nodes + 1] - starts
        # Concatenated ranges starts[i] .. starts[i]+counts[i], without a Python loop.
        edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(
            int(counts.sum())
        )
        return edges, counts

    def chunks(self, nodes: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, int]]:
        """Packed sequences: (node ids, number of leading context-only ancestors).

        `nodes` must be closed under ancestors (root excluded) and in pre-order: then every
        ancestor of a chunk node is either in the chunk or an ancestor of the chunk's first node.
        """
        for start in range(0, len(nodes), chunk_size):
            chunk = nodes[start : start + chunk_size]
            context = self.ancestors(int(chunk[0]))
            yield np.concatenate([np.asarray(context, dtype=np.int64), chunk]), len(context)

    def value_logprobs(self, edge_lp: np.ndarray) -> np.ndarray:
        """log-probability of every value's full token sequence (end token included) from the
        log-probability of every edge, [M] (NaN where an edge on the path is NaN)."""
        per_step = edge_lp[self.value_edges]
        return np.add.reduceat(per_step, self.value_offsets[:-1]) if per_step.size else per_step
