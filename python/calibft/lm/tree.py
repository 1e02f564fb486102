"""Tree attention: a trie of completions teacher-forced in packed forward passes after one prompt.

The model's probability of a canonical string is the product, along the string's trie path, of the
model's next-token probabilities; every internal trie node is therefore one position whose
next-token distribution we need, and nothing else is. The trie is teacher-forced over one shared
prompt KV cache with *tree attention*: trie nodes are packed into one sequence in DFS pre-order
(`calibft.lm.layout`), each node's token attends to the prompt and to its own ancestors only (a 4D
mask), and its position id is its depth after the prompt. Each node is evaluated once, so shared
prefixes are never recomputed. Layers with a sliding window get their own mask, cut to the keys
that real decoding would see (see `attention_spans`; docs/architectures.md).

This is model-architecture code: benchmarks reach it through the `LM` protocol
(`LM.trie_logprobs`, `LM.trie_logit_kl`); `exact_logprobs` and `logit_kl` are the public API on a
bare transformers model. Every pass enters through `tree_hidden_states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from calibft.lm.attention import check_tree_attention
from calibft.lm.decode import (
    PromptState,
    lm_head_logits,
    logit_head,
    model_device,
    prefill,
    run_decoder,
)
from calibft.lm.layout import DEFAULT_CHUNK_SIZE, TrieLayout
from calibft.losses import SparseTargets, sparse_kl_per_position

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
        width = None if window is None else int(window)
        span = AttentionSpan(int(keys.shape[-2]), width)
        # A window-W layer needs the last W - 1 prompt positions (the node itself is the W-th).
        needed = state.length if width is None else min(state.length, width - 1)
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
) -> torch.Tensor | dict[str | None, torch.Tensor]:
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
    for seq, context in layout.chunks(nodes, chunk_size):
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
    edges, counts = layout.edges_of(nodes)
    rows = np.repeat(np.arange(len(nodes)), counts)
    picked = logprobs[torch.from_numpy(rows), torch.from_numpy(layout.tokens[edges])]
    out[edges] = picked.double().cpu().numpy()


@torch.inference_mode()
def edge_logprobs(
    model: Any,
    state: PromptState,
    layout: TrieLayout,
    nodes: np.ndarray | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> np.ndarray:
    """log p_model(edge token | edge's parent prefix) of the outgoing edges of `nodes`, float64
    [E], NaN on the other edges. ``nodes=None`` scores every internal node in one pre-order
    pass; otherwise the nodes' ancestors ride along as attention context only."""
    out = np.full(len(layout.tokens), np.nan)
    if nodes is None:
        for chunk, hidden in tree_hidden_states(
            model, state, layout, layout.internal, chunk_size=chunk_size, progress=progress
        ):
            _score_edges(model, layout, chunk, hidden, out)
        return out
    wanted = np.zeros(layout.num_nodes, dtype=bool)
    wanted[nodes] = True
    for chunk, hidden in tree_hidden_states(
        model, state, layout, layout.closure(nodes), chunk_size=chunk_size, progress=progress
    ):
        scored = wanted[chunk]
        if scored.any():
            _score_edges(model, layout, chunk[scored], hidden[torch.from_numpy(scored)], out)
    return out


def path_logit_kl(
    model: Any, state: PromptState, trie: Any, layout: TrieLayout, num_paths: int, seed: int
) -> float:
    """The logit-level KL of docs/benchmarks/structured.md §4 after a prefilled prompt: mean over
    sampled target paths of the mean over positions of
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
        return layout.value_logprobs(edge_logprobs(model, state, layout))


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
        return path_logit_kl(model, state, trie, layout, num_paths, seed)
