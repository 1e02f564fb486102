"""Exact, sampling-free model distribution over a prompt's output space.

The model's probability of a canonical string is the product, along the string's trie path, of the
model's next-token probabilities; every internal trie node is therefore one position whose
next-token distribution we need, and nothing else is. The whole trie is teacher-forced over one
shared prompt KV cache with *tree attention*: trie nodes are packed into one sequence in DFS
pre-order, each node's token attends to the prompt and to its own ancestors only (a 4D mask), and
its position id is its depth after the prompt. Each node is evaluated once, so shared prefixes are
never recomputed (batching whole leaf paths instead recomputes every shared prefix). Layers with a
sliding window get their own mask, cut to the keys that real decoding would see (see
`attention_spans`; docs/architectures.md).

From the per-node distributions: the exact mass the model puts on canonical outputs, the exact W1
between the model's renormalized distribution and the target, and the exact sequence-level
KL(target || model). Optionally (``tolerance`` > 0) the trie is expanded most probable prefixes
first and the pass stops early, with a reported bound on the mass it leaves unresolved.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from calibft.eval.metrics import discrete_w1, w1_scale
from calibft.lm.attention import check_tree_attention
from calibft.lm.decode import (
    PromptState,
    lm_head_logits,
    logit_head,
    model_device,
    prefill,
    run_decoder,
)
from calibft.losses import SparseTargets, sparse_kl_per_position

DEFAULT_CHUNK_SIZE = 512
"""Trie nodes per packed forward pass: large enough for efficient matrix products, small enough
that the dense (chunk x (prompt + chunk)) attention mask stays cheap next to the MLPs."""


DEFAULT_TOLERANCE = 0.0
"""Default `tolerance` of `calibft eval`: score every node. Pruning pays only for a model that puts
most of its mass on few canonical strings; for a calibrated model, which spreads it over the whole
trie, the rounds cost more than one full pass (BENCHMARKS.md §5)."""

DISPLAY_BINS = 80
"""Bins of a continuous space's stored histogram (integer spaces get one bin per value)."""

PRUNING_FLOORS = (1e-4, 1e-6, 1e-8, 1e-10, 0.0)
"""Prefix-probability floors of the pruned trie walk's successive rounds (see `exact_distribution`);
the last round expands whatever is left."""


@dataclass(frozen=True)
class TrieLayout:
    """Node-level arrays of a trie derived from its CSR form, shared by every model.

    ``order`` lists all nodes in DFS pre-order; in that order a node's ancestors come before it and
    every subtree is contiguous, which is what makes a contiguous chunk plus the first node's
    ancestors closed under "ancestor of".
    """

    offsets: np.ndarray  # int64 [N+1]
    tokens: np.ndarray  # int64 [E], the token on edge e
    children: np.ndarray  # int64 [E], the node edge e leads to
    parent: np.ndarray  # int64 [N], -1 at the root
    depth: np.ndarray  # int64 [N]
    token_in: np.ndarray  # int64 [N], token on the edge into the node (-1 at the root)
    order: np.ndarray  # int64 [N], nodes in DFS pre-order
    value_offsets: np.ndarray  # int64 [M+1]
    value_edges: np.ndarray  # int64 [...], edges along each value's path, root to leaf

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
        offsets = np.asarray(trie.node_offsets, dtype=np.int64)
        tokens = np.asarray(trie.child_tokens, dtype=np.int64)
        children = np.asarray(trie.child_nodes, dtype=np.int64)
        n = len(offsets) - 1
        degree = np.diff(offsets)
        owner = np.repeat(np.arange(n, dtype=np.int64), degree)
        parent = np.full(n, -1, dtype=np.int64)
        parent[children] = owner
        token_in = np.full(n, -1, dtype=np.int64)
        token_in[children] = tokens
        levels = _levels(offsets, children)
        depth = np.zeros(n, dtype=np.int64)
        for d, level in enumerate(levels):
            depth[level] = d
        # Subtree sizes bottom-up, then pre-order ranks top-down: a child's rank is its parent's
        # rank + 1 + the sizes of its earlier siblings.
        size = np.ones(n, dtype=np.int64)
        for level in reversed(levels[1:]):
            np.add.at(size, parent[level], size[level])
        before = np.cumsum(size[children]) - size[children]
        first_edge = offsets[owner]
        earlier_siblings = before - before[first_edge]
        edge_into = np.zeros(n, dtype=np.int64)
        edge_into[children] = np.arange(len(children))
        rank = np.zeros(n, dtype=np.int64)
        for level in levels[1:]:
            edges = edge_into[level]
            rank[level] = rank[owner[edges]] + 1 + earlier_siblings[edges]
        order = np.empty(n, dtype=np.int64)
        order[rank] = np.arange(n)
        value_offsets, value_edges = _value_edges(trie, tokens, children, owner)
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


def _levels(offsets: np.ndarray, children: np.ndarray) -> list[np.ndarray]:
    """Nodes grouped by depth, from the root down."""
    levels = [np.zeros(1, dtype=np.int64)]
    while True:
        edges, _ = _edges_of(offsets, levels[-1])
        if edges.size == 0:
            return levels
        levels.append(children[edges])


def _edges_of(offsets: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All outgoing edges of `nodes` in CSR `offsets`, node by node, and each node's edge count."""
    starts = offsets[nodes]
    counts = offsets[nodes + 1] - starts
    # Concatenated ranges starts[i] .. starts[i]+counts[i], without a Python loop.
    edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    return edges, counts


def _value_edges(
    trie: Any, tokens: np.ndarray, children: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The edge taken at every step of every value's path (looked up by (node, token) keys)."""
    path_offsets, path_ids = (np.asarray(a, dtype=np.int64) for a in trie.value_paths())
    lengths = np.diff(path_offsets)
    width = int(tokens.max()) + 1 if len(tokens) else 1
    keys = owner * width + tokens
    sort = np.argsort(keys, kind="stable")
    sorted_keys = keys[sort]
    edges = np.empty(len(path_ids), dtype=np.int64)
    node = np.zeros(len(lengths), dtype=np.int64)
    for step in range(int(lengths.max()) if len(lengths) else 0):
        active = np.flatnonzero(lengths > step)
        at = path_offsets[active] + step
        query = node[active] * width + path_ids[at]
        found = sort[np.minimum(np.searchsorted(sorted_keys, query), len(sort) - 1)]
        if not np.array_equal(keys[found], query):
            raise ValueError("trie.value_paths() disagrees with the trie's edges")
        edges[at] = found
        node[active] = children[found]
    return path_offsets, edges


def _chunks(
    layout: TrieLayout, nodes: np.ndarray, chunk_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Packed sequences: (node ids, number of leading context-only ancestors).

    `nodes` must be closed under ancestors (root excluded) and in pre-order: then every ancestor of
    a chunk node is either in the chunk or an ancestor of the chunk's first node.
    """
    for start in range(0, len(nodes), chunk_size):
        chunk = nodes[start : start + chunk_size]
        context = layout.ancestors(int(chunk[0]))
        yield np.concatenate([np.asarray(context, dtype=np.int64), chunk]), len(context)


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class AttentionSpan:
    """What the layers of one attention type see of the prompt while decoding after it."""

    cached: int  # prompt positions their KV cache holds: the last `cached` ones
    window: int | None  # sliding window W (a query at q sees keys p with q - p < W); None: all


def attention_spans(model: Any, state: PromptState) -> dict[str | None, AttentionSpan]:
    """The attention span of each layer type of `model`'s decoder after `state`'s prompt.

    Keyed by the config's layer types ("full_attention", "sliding_attention"), the keys under
    which such decoders take one mask per type; by None for a model without layer types, whose
    layers all take the same mask. The cached length is read from the prompt's KV cache (a sliding
    layer keeps only the last W - 1 positions), the window from the cache layer. Raises ValueError
    for attention this module cannot mask exactly (chunked, linear, shared-KV layers).
    """
    config = model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    layers = list(getattr(state.cache, "layers", ()))
    if not layers or (types is not None and len(types) < len(layers)):
        raise ValueError(
            f"the exact pass does not know the KV cache of model {config.model_type!r} "
            f"({type(state.cache).__name__})"
        )
    spans: dict[str | None, AttentionSpan] = {}
    for i, layer in enumerate(layers):
        kind = types[i] if types is not None else None
        keys = getattr(layer, "keys", None)  # None: a layer that reads another's KV (Gemma 3n)
        if kind not in (FULL_ATTENTION, SLIDING_ATTENTION, None) or keys is None:
            raise ValueError(
                f"the exact pass supports full and sliding-window attention; layer {i} of model "
                f"{config.model_type!r} is {kind or type(layer).__name__!r}"
            )
        window = getattr(layer, "sliding_window", None)
        span = AttentionSpan(int(keys.shape[-2]), None if window is None else int(window))
        # A window-W layer needs the last W - 1 prompt positions (the node itself is the W-th).
        needed = state.length if window is None else min(state.length, span.window - 1)
        consistent = kind is None or (kind == SLIDING_ATTENTION) == (window is not None)
        if not consistent or span.cached < needed or spans.setdefault(kind, span) != span:
            raise ValueError(
                f"layer {i} of model {config.model_type!r} ({kind or 'attention'}) caches "
                f"{span.cached} of the prompt's {state.length} positions with window {window}, "
                "which the exact pass cannot mask"
            )
    return spans


def _ancestry(layout: TrieLayout, seq: np.ndarray) -> np.ndarray:
    """visible[i, j]: packed node j is node i or one of its ancestors, bool [S, S]."""
    s = len(seq)
    where = np.full(layout.num_nodes, -1, dtype=np.int64)
    where[seq] = np.arange(s)
    visible = np.zeros((s, s), dtype=bool)
    rows = np.arange(s)
    walk = seq.copy()
    while True:
        col = where[walk]
        hit = (walk > 0) & (col >= 0)
        if not hit.any():
            return visible
        visible[rows[hit], col[hit]] = True
        walk = np.where(walk > 0, layout.parent[walk], 0)


def _tree_mask(
    span: AttentionSpan,
    ancestry: np.ndarray,
    depth: np.ndarray,
    prompt_len: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """Additive attention mask [1, 1, S, cached + S] (dtype and device of `like`) of packed trie
    nodes at trie depths `depth`: each sees the cached prompt keys and its ancestors and itself,
    those less than the window away.

    A node at depth d sits at position prompt_len - 1 + d, the cached prompt keys at
    prompt_len - cached … prompt_len - 1; a query at q sees a key at p when q - p < W, the rule
    of transformers' sliding-window masks (the query itself and the W - 1 positions before it).
    """
    prompt = np.ones((len(depth), span.cached), dtype=bool)
    tree = ancestry
    if span.window is not None:
        query = prompt_len - 1 + depth[:, None]
        keys = np.arange(prompt_len - span.cached, prompt_len)[None, :]
        prompt = query - keys < span.window
        tree = ancestry & (depth[:, None] - depth[None, :] < span.window)
    visible = np.concatenate([prompt, tree], axis=1)
    hidden = torch.from_numpy(~visible).to(like.device)
    mask = torch.zeros(visible.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill_(hidden, torch.finfo(like.dtype).min)[None, None]


def _tree_masks(
    spans: dict[str | None, AttentionSpan],
    layout: TrieLayout,
    seq: np.ndarray,
    prompt_len: int,
    like: torch.Tensor,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The decoder's `attention_mask` for a packed chunk: one mask when every layer attends
    alike (a 4D mask is then used as is by every layer), else one per layer type."""
    ancestry = _ancestry(layout, seq)
    depth = layout.depth[seq]
    masks = {
        kind: _tree_mask(span, ancestry, depth, prompt_len, like) for kind, span in spans.items()
    }
    return next(iter(masks.values())) if len(set(spans.values())) == 1 else masks


@torch.inference_mode()
def tree_hidden_states(
    model: Any,
    state: PromptState,
    layout: TrieLayout,
    nodes: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Final hidden states at trie nodes, chunk by chunk: yields (node ids, hidden [n, H]).

    The hidden state at a node gives the model's next-token distribution after the node's prefix.
    `nodes` (pre-order, closed under ancestors) may include the root, served from the prefill.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_tree_attention(model)
    nodes = np.asarray(nodes, dtype=np.int64)
    if nodes.size and nodes[0] == 0:
        yield nodes[:1], state.last_hidden[None]
        nodes = nodes[1:]
    device = model_device(model)
    like = torch.empty(0, dtype=next(model.parameters()).dtype, device=device)
    spans = attention_spans(model, state)
    bar = tqdm(total=len(nodes), desc="trie nodes", unit="node", disable=not progress, leave=False)
    for seq, context in _chunks(layout, nodes, chunk_size):
        ids = torch.from_numpy(layout.token_in[seq])[None].to(device)
        positions = torch.from_numpy(state.length - 1 + layout.depth[seq])[None].to(device)
        mask = _tree_masks(spans, layout, seq, state.length, like)
        out = run_decoder(
            model, state.fresh_cache(), input_ids=ids, attention_mask=mask, position_ids=positions
        )
        bar.update(len(seq) - context)
        yield seq[context:], out.last_hidden_state[0, context:]
    bar.close()


def _score_edges(
    model: Any, layout: TrieLayout, nodes: np.ndarray, hidden: torch.Tensor, out: np.ndarray
) -> None:
    """Write log p(edge token | node prefix) of every outgoing edge of `nodes` into `out`."""
    logits = lm_head_logits(model, hidden)
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    edges, counts = _edges_of(layout.offsets, nodes)
    rows = np.repeat(np.arange(len(nodes)), counts)
    picked = logprobs[torch.from_numpy(rows), torch.from_numpy(layout.tokens[edges])]
    out[edges] = picked.double().cpu().numpy()


@torch.inference_mode()
def edge_logprobs(
    model: Any,
    state: PromptState,
    layout: TrieLayout,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> np.ndarray:
    """log p_model(edge token | edge's parent prefix) for every trie edge, float64 [E]: every
    internal node scored, in one pre-order pass."""
    out = np.full(len(layout.tokens), np.nan)
    for nodes, hidden in tree_hidden_states(
        model, state, layout, layout.internal, chunk_size=chunk_size, progress=progress
    ):
        _score_edges(model, layout, nodes, hidden, out)
    return out


@torch.inference_mode()
def _expand(
    model: Any,
    state: PromptState,
    layout: TrieLayout,
    frontier: np.ndarray,
    floor: float,
    edge_lp: np.ndarray,
    prefix_lp: np.ndarray,
    *,
    chunk_size: int,
    progress: bool,
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
        wanted = np.zeros(layout.num_nodes, dtype=bool)
        wanted[expand] = True
        # The expanded nodes' ancestors ride along as attention context only.
        for nodes, hidden in tree_hidden_states(
            model, state, layout, layout.closure(expand), chunk_size=chunk_size, progress=progress
        ):
            scored = wanted[nodes]
            if scored.any():
                _score_edges(
                    model, layout, nodes[scored], hidden[torch.from_numpy(scored)], edge_lp
                )
        edges, counts = _edges_of(layout.offsets, expand)
        children = layout.children[edges]
        prefix_lp[children] = np.repeat(prefix_lp[expand], counts) + edge_lp[edges]
        frontier = children[degree[children] > 0]
    return np.concatenate(pending) if pending else frontier


def value_logprobs(layout: TrieLayout, edge_lp: np.ndarray) -> np.ndarray:
    """Model log-probability of every value's full token sequence (end token included), [M]."""
    per_step = edge_lp[layout.value_edges]
    return np.add.reduceat(per_step, layout.value_offsets[:-1]) if per_step.size else per_step


# ---------------------------------------------------------------------------------------------
# Metrics of the exact distribution


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


def exact_distribution(
    model: Any,
    state: PromptState,
    space: Any,
    layout: TrieLayout,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tolerance: float = 0.0,
    progress: bool = False,
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
        edge_lp = edge_logprobs(model, state, layout, chunk_size=chunk_size, progress=progress)
        return exact_metrics(space, value_logprobs(layout, edge_lp))
    edge_lp = np.full(len(layout.tokens), np.nan)
    prefix_lp = np.zeros(layout.num_nodes)
    pending = np.zeros(1, dtype=np.int64)  # the root
    for floor in PRUNING_FLOORS:
        pending = _expand(
            model,
            state,
            layout,
            pending,
            floor,
            edge_lp,
            prefix_lp,
            chunk_size=chunk_size,
            progress=progress,
        )
        logprobs = value_logprobs(layout, edge_lp)
        unresolved = float(np.exp(prefix_lp[pending]).sum())
        resolved = float(np.exp(logprobs[~np.isnan(logprobs)]).sum())
        if unresolved <= tolerance * resolved:
            break
    return exact_metrics(space, logprobs, unresolved)


def prompt_logit_kl(
    model: Any, state: PromptState, trie: Any, layout: TrieLayout, num_paths: int, seed: int
) -> float:
    """The structured benchmark's logit-level KL (docs/benchmarks/structured.md §4) after a
    prefilled prompt: mean over sampled target paths of the mean over positions of
    KL(q(.|p_k) || softmax(z_k)), computed by the training loss's own sparse-KL kernel."""
    value_index, path_offsets, path_ids = trie.sample_paths(num_paths, seed)
    per_path_nodes = []
    for i in np.asarray(value_index, dtype=np.int64):
        edges = layout.value_edges[layout.value_offsets[i] : layout.value_offsets[i + 1]]
        # Positions k = 0..L: the root, then the node after each token but the terminator.
        per_path_nodes.append(np.concatenate([[0], layout.children[edges[:-1]]]))
    nodes = layout.closure(np.concatenate(per_path_nodes))
    hidden_of: dict[int, torch.Tensor] = {}
    for chunk_nodes, hidden in tree_hidden_states(model, state, layout, nodes):
        hidden_of.update(zip(chunk_nodes.tolist(), hidden, strict=True))
    path_offsets = np.asarray(path_offsets, dtype=np.int64)
    path_ids = np.asarray(path_ids)
    targets = SparseTargets.from_csr(
        [
            trie.targets_along(path_ids[a:b])
            for a, b in zip(path_offsets[:-1], path_offsets[1:], strict=True)
        ]
    )
    order = np.concatenate(per_path_nodes)
    head = logit_head(model)
    kl = (
        sparse_kl_per_position(
            torch.stack([hidden_of[int(u)] for u in order]),
            head.weight,
            targets.to(head.weight.device),
            bias=head.bias,
            softcap=head.softcap,
        )
        .double()
        .cpu()
        .numpy()
    )
    bounds = np.cumsum([0] + [len(p) for p in per_path_nodes])
    return float(np.mean([kl[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))


@contextlib.contextmanager
def _evaluation_mode(model: Any) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _prompt_state(model: Any, prompt_ids: Sequence[int]) -> PromptState:
    check_tree_attention(model)  # before the prefill, which may fail first under another kernel
    ids = [int(t) for t in prompt_ids]
    vocab = model.get_input_embeddings().num_embeddings
    if not all(0 <= t < vocab for t in ids):
        raise ValueError(f"prompt_ids must be token ids in [0, {vocab}) of this model")
    return prefill(model, ids)


def exact_logprobs(model: Any, prompt_ids: Sequence[int], trie: Any) -> np.ndarray:
    """The model's log-probability of every completion of `trie` after `prompt_ids`, float64 [M].

    Entry i is log p(value i's tokens, terminator included | prompt), in the trie's value order
    (`trie.value_paths()`), computed exactly by one tree-attention pass over the trie (every
    internal node scored once). `model` is any transformers causal LM, or a PEFT model wrapping
    one; `prompt_ids` the prompt's token ids (e.g. `ChatFormat.prompt_ids`).
    """
    layout = TrieLayout.from_trie(trie)
    with _evaluation_mode(model):
        state = _prompt_state(model, prompt_ids)
        return value_logprobs(layout, edge_logprobs(model, state, layout))


def logit_kl(
    model: Any, prompt_ids: Sequence[int], trie: Any, *, num_paths: int = 4, seed: int = 0
) -> float:
    """The structured benchmark's logit-level KL of `model` after `prompt_ids` against `trie`'s
    targets (docs/benchmarks/structured.md §4): over `num_paths` target paths drawn with `seed`,
    the mean over paths of the mean over positions of KL(q || softmax(z)), in nats."""
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths}")
    layout = TrieLayout.from_trie(trie)
    with _evaluation_mode(model):
        state = _prompt_state(model, prompt_ids)
        return prompt_logit_kl(model, state, trie, layout, num_paths, seed)


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
