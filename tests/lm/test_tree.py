"""The tree-attention pass (calibft.lm.tree) against brute force, and against sampling; the
structured benchmark's exact pass on it (pruned walk)."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from tiny_models import teacher_forced_logprob, tiny_model
from transformers import MistralConfig, MistralForCausalLM

from calibft.eval.benchmarks.structured.exact import PRUNING_FLOORS, exact_distribution
from calibft.eval.metrics import w1
from calibft.lm import HFSession
from calibft.lm.decode import prefill
from calibft.lm.layout import TrieLayout
from calibft.lm.sample import sample_completions
from calibft.lm.tree import AttentionSpan, attention_spans, edge_logprobs, exact_logprobs, logit_kl
from calibft.targets.numeric import build_output_space
from calibft.targets.trie import TrieTokenizer, build_trie, build_trie_from_ids

BINOMIAL_PROMPT = "Generate exactly ONE random number from a Binomial distribution."
PROMPT = (
    "Generate exactly ONE random number from a Gaussian distribution with parameters mu=0, sigma=1."
)


@pytest.fixture(scope="module")
def trie_tokenizer(tokenizer, chat):
    return TrieTokenizer.from_hf(tokenizer, chat)


def _session(model, tokenizer, chat):
    return HFSession(model, tokenizer, chat, [chat.end_token_id])


def _gaussian(trie_tokenizer, decimals=1, max_bins=60):
    space = build_output_space(
        "gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=decimals, max_bins=max_bins
    )
    return space, build_trie(space, trie_tokenizer)


def _digit_model(tokenizer, chat, arch="llama", seed=0):
    """A tiny random model that mostly answers one digit: its head favours digits (unequally) at
    the answer's start, and the end token right after a digit. Its output distribution then
    lives mostly on the canonical strings of a small integer space, and is far from uniform, so
    sampling errors show (a plain random model spreads its mass over the whole vocabulary)."""
    model = tiny_model(tokenizer, arch, seed=seed)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    end = chat.end_token_id
    bias = torch.full((head.out_features,), -8.0)
    bias[digits] = torch.tensor([0.3, 1.6, -0.4, 2.2, 0.9, 0.0, 1.2, -0.6, 2.5, 0.6])
    bias[end] = -1.0
    marker = torch.zeros(head.in_features)
    marker[0] = 1.0
    with torch.no_grad():
        # The residual stream of a tiny random model is mostly the token embedding: a marker
        # direction on digit embeddings, read by the end token's head row, ends after a digit.
        model.get_input_embeddings().weight[digits] += 0.3 * marker
        biased.weight.copy_(head.weight)
        biased.weight[end] += 1.0 * marker
        biased.bias.copy_(bias)
    model.lm_head = biased
    return model.eval()


def test_layout_is_preorder_with_correct_value_edges(trie_tokenizer) -> None:
    _, trie = _gaussian(trie_tokenizer)
    layout = TrieLayout.from_trie(trie)
    rank = np.empty(layout.num_nodes, dtype=np.int64)
    rank[layout.order] = np.arange(layout.num_nodes)
    assert layout.order[0] == 0
    assert (rank[layout.parent[1:]] < rank[1:]).all()  # ancestors first
    # each subtree is one contiguous block of the order: its size equals its rank span
    size = np.bincount(layout.parent[1:], minlength=layout.num_nodes)
    for u in np.argsort(-layout.depth):
        if u:
            size[layout.parent[u]] += size[u]
    size += 1
    for u in range(layout.num_nodes):
        block = layout.order[rank[u] : rank[u] + size[u]]
        walk = block.copy()
        for _ in range(int(layout.depth.max()) + 1):
            walk = np.where((walk != u) & (walk > 0), layout.parent[walk], walk)
        assert (walk == u).all()
    offsets, ids = trie.value_paths()
    for i in range(trie.num_values):
        edges = layout.value_edges[layout.value_offsets[i] : layout.value_offsets[i + 1]]
        np.testing.assert_array_equal(layout.tokens[edges], ids[offsets[i] : offsets[i + 1]])
        assert layout.parent[layout.children[edges[0]]] == 0
        np.testing.assert_array_equal(
            layout.parent[layout.children[edges[1:]]], layout.children[edges[:-1]]
        )
        assert (
            layout.offsets[layout.children[edges[-1]] + 1]
            == layout.offsets[layout.children[edges[-1]]]
        )


def _reference_layout(trie):
    """Pre-order, parents, depths and value edges of a trie by a plain recursive walk."""
    offsets = trie.node_offsets
    n = len(offsets) - 1
    parent, depth, order = [-1] * n, [0] * n, []

    def visit(node):
        order.append(node)
        for edge in range(offsets[node], offsets[node + 1]):
            child = edge + 1  # breadth-first numbering
            parent[child], depth[child] = node, depth[node] + 1
            visit(child)

    visit(0)
    path_offsets, ids = trie.value_paths()
    edges = []
    for i in range(trie.num_values):
        node = 0
        for token in ids[path_offsets[i] : path_offsets[i + 1]]:
            span = range(offsets[node], offsets[node + 1])
            edge = next(e for e in span if trie.child_tokens[e] == token)
            edges.append(edge)
            node = edge + 1
    return order, parent, depth, path_offsets, edges


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 5), max_size=5).map(tuple), min_size=1, max_size=25, unique=True
    )
)
def test_rust_layout_equals_a_recursive_walk(sequences) -> None:
    ids = [[t + 1 for t in seq] + [0] for seq in sequences]  # token 0 ends every value
    offsets = np.cumsum([0] + [len(s) for s in ids])
    trie = build_trie_from_ids(
        offsets, np.concatenate(ids).astype(np.int32), np.full(len(ids), 1.0 / len(ids))
    )
    order, parent, depth, value_offsets, value_edges = _reference_layout(trie)
    layout = TrieLayout.from_trie(trie)
    np.testing.assert_array_equal(layout.order, order)
    np.testing.assert_array_equal(layout.parent, parent)
    np.testing.assert_array_equal(layout.depth, depth)
    np.testing.assert_array_equal(layout.value_offsets, value_offsets)
    np.testing.assert_array_equal(layout.value_edges, value_edges)
    assert all(a.dtype == np.int64 for a in trie.layout())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_probabilities_equal_brute_force_scoring(
    tokenizer, chat, trie_tokenizer, arch
) -> None:
    space, trie = _gaussian(trie_tokenizer, decimals=1, max_bins=40)
    model = tiny_model(tokenizer, arch, seed=3)
    prompt_ids = chat.prompt_ids(PROMPT)
    layout = TrieLayout.from_trie(trie)
    state = prefill(model, prompt_ids)
    offsets, ids = trie.value_paths()
    brute = np.array(
        [
            teacher_forced_logprob(model, prompt_ids, ids[offsets[i] : offsets[i + 1]].tolist())
            for i in range(len(space))
        ]
    )
    # Chunk sizes that cut the trie in many places (1: one node per pass) and not at all.
    for chunk_size in (1, 5, 4096):
        exact = layout.value_logprobs(edge_logprobs(model, state, layout, chunk_size=chunk_size))
        np.testing.assert_allclose(exact, brute, rtol=0, atol=1e-5)
    probs = np.exp(exact)
    assert 0 < probs.sum() <= 1


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_pruned_walk_matches_full_walk_and_bounds_what_it_skips(
    tokenizer, chat, trie_tokenizer, chunk_size
) -> None:
    space, trie = _gaussian(trie_tokenizer, decimals=2, max_bins=400)
    model = _session(_digit_model(tokenizer, chat), tokenizer, chat)
    layout = TrieLayout.from_trie(trie)
    state = model.prefill(chat.prompt_ids(PROMPT))
    full = exact_distribution(model, state, space, layout)
    assert full.unresolved_mass == 0.0

    # A tolerance no round can meet until the last: the walk expands the whole trie.
    everything = exact_distribution(
        model, state, space, layout, chunk_size=chunk_size, tolerance=1e-300
    )
    np.testing.assert_allclose(everything.probs, full.probs, rtol=1e-4)
    assert everything.unresolved_mass == 0.0

    # A loose tolerance stops after the first round.
    pruned = exact_distribution(model, state, space, layout, chunk_size=chunk_size, tolerance=0.5)
    resolved = pruned.probs > 0
    assert 0 < resolved.sum() < len(space)
    assert 0 < pruned.unresolved_mass <= 0.5 * pruned.valid_mass
    np.testing.assert_allclose(pruned.probs[resolved], full.probs[resolved], rtol=1e-4)
    # Every skipped string lies under a prefix below the first floor, and the unresolved mass
    # covers all of them.
    assert (full.probs[~resolved] < PRUNING_FLOORS[0] * 1.001).all()  # float32 noise between walks
    assert full.probs[~resolved].sum() <= pruned.unresolved_mass + 1e-12
    assert full.valid_mass - pruned.unresolved_mass - 1e-12 <= pruned.valid_mass <= full.valid_mass
    assert math.isnan(pruned.sequence_kl) and math.isfinite(full.sequence_kl)


def test_pruning_tolerance_is_validated(tokenizer, chat, trie_tokenizer) -> None:
    space, trie = _gaussian(trie_tokenizer)
    model = _session(tiny_model(tokenizer, "llama", seed=0), tokenizer, chat)
    state = model.prefill(chat.prompt_ids(PROMPT))
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tolerance"):
            exact_distribution(model, state, space, TrieLayout.from_trie(trie), tolerance=bad)


def _completion_index(trie):
    offsets, ids = trie.value_paths()
    return {tuple(ids[offsets[i] : offsets[i + 1] - 1].tolist()): i for i in range(trie.num_values)}


@pytest.fixture(scope="module")
def binomial_setup(tokenizer, chat, trie_tokenizer):
    params = {"n": 9, "p": 0.3}
    space = build_output_space("binomial", params, max_bins=64)
    trie = build_trie(space, trie_tokenizer)
    model = _digit_model(tokenizer, chat)
    state = prefill(model, chat.prompt_ids(BINOMIAL_PROMPT))
    exact = exact_distribution(
        _session(model, tokenizer, chat), state, space, TrieLayout.from_trie(trie)
    )
    return params, space, trie, model, state, exact


def _chi_square_p(model, state, trie, probs, chat, n=20000, seed=11):
    """p-value of sampled string frequencies against `probs` (canonical strings, then "other")."""
    completions = sample_completions(
        model, state, n, seed=seed, end_ids=[chat.end_token_id], max_new_tokens=6, batch_size=5000
    )
    index = _completion_index(trie)
    counts = np.zeros(len(probs))
    for ids in completions:
        counts[index.get(tuple(ids), len(probs) - 1)] += 1
    big = probs * n >= 5  # pool categories too rare for the chi-square approximation
    f_obs = np.append(counts[big], counts[~big].sum())
    f_exp = np.append(probs[big], probs[~big].sum()) * n
    keep = f_exp > 0
    return stats.chisquare(f_obs[keep], f_exp[keep] * f_obs[keep].sum() / f_exp[keep].sum()).pvalue


def test_sampled_frequencies_match_exact_probabilities(binomial_setup, chat, monkeypatch) -> None:
    _, space, trie, model, state, exact = binomial_setup
    assert 0.1 < exact.valid_mass < 0.95  # canonical outputs carry a sizeable, not total, share
    expected = np.append(exact.probs, 1 - exact.valid_mass)
    assert (expected * 20000 >= 5).sum() >= 8
    assert _chi_square_p(model, state, trie, expected, chat) > 1e-3
    # The test has power: it rejects probabilities moved by 0.01...
    wrong = expected.copy()
    top = np.argsort(expected[:-1])[-2:]
    wrong[top] += np.array([-0.01, 0.01])
    assert _chi_square_p(model, state, trie, wrong, chat) < 1e-4
    # ...and a sampler that is slightly off (temperature 1.1 instead of 1).
    import calibft.lm.sample as sampling

    original = sampling.lm_head_logits
    monkeypatch.setattr(sampling, "lm_head_logits", lambda m, h: original(m, h) / 1.1)
    assert _chi_square_p(model, state, trie, expected, chat) < 1e-4


def test_sampled_w1_scatters_around_exact_w1(binomial_setup, chat) -> None:
    params, space, trie, model, state, exact = binomial_setup
    index = _completion_index(trie)
    # Sampled W1 of 1000 generations (kept: canonical outputs) for several seeds...
    sampled = []
    for seed in range(6):
        completions = sample_completions(
            model,
            state,
            1000,
            seed=100 + seed,
            end_ids=[chat.end_token_id],
            max_new_tokens=6,
            batch_size=1000,
        )
        values = [space.numeric[index[tuple(ids)]] for ids in completions if tuple(ids) in index]
        sampled.append(w1(np.array(values), "binomial", params, normalized=True))
    # ...against the same statistic on draws from the exact distribution: the sampling error.
    rng = np.random.default_rng(0)
    renormalized = exact.probs / exact.valid_mass
    k = round(1000 * exact.valid_mass)
    reference = np.array(
        [
            w1(
                rng.choice(space.numeric, size=k, p=renormalized),
                "binomial",
                params,
                normalized=True,
            )
            for _ in range(300)
        ]
    )
    spread = reference.std()
    # The sampled W1s have the mean and spread of draws from the exact distribution...
    assert abs(np.mean(sampled) - reference.mean()) < 4 * spread / math.sqrt(len(sampled))
    assert 0.3 * spread < np.std(sampled, ddof=1) < 3 * spread
    # ...which centre on the exact W1 (the finite-sample bias is well below the sampling error).
    assert abs(reference.mean() - exact.normalized_w1) < 0.5 * spread
    assert all(abs(s - exact.normalized_w1) < 4 * spread for s in sampled)


def test_sampling_is_seeded(binomial_setup, chat) -> None:
    *_, model, state, _ = binomial_setup
    kwargs = dict(end_ids=[chat.end_token_id], max_new_tokens=6, batch_size=7)
    a = sample_completions(model, state, 30, seed=5, **kwargs)
    b = sample_completions(model, state, 30, seed=5, **kwargs)
    c = sample_completions(model, state, 30, seed=6, **kwargs)
    assert a == b != c
    assert len(a) == 30 and all(len(ids) <= 6 for ids in a)
    assert all(chat.end_token_id not in ids for ids in a)


def test_cached_forwards_use_no_deprecated_argument(binomial_setup, tokenizer, chat) -> None:
    # transformers 5.2x deprecated the decoder's `past_key_values` argument with a FutureWarning
    # on every call, which the sampling loop and the tree pass would print to the user.
    _, space, trie, model, _, exact = binomial_setup
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        state = prefill(model, chat.prompt_ids(BINOMIAL_PROMPT))
        completions = sample_completions(
            model, state, 8, seed=0, end_ids=[chat.end_token_id], max_new_tokens=4, batch_size=8
        )
        again = exact_distribution(
            _session(model, tokenizer, chat), state, space, TrieLayout.from_trie(trie)
        )
    assert len(completions) == 8
    np.testing.assert_allclose(again.probs, exact.probs, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logit_kl_equals_dense_reference(tokenizer, chat, trie_tokenizer, arch) -> None:
    """The structured benchmark's logit KL (docs/benchmarks/structured.md §4), recomputed densely:
    full forward, full-vocabulary log-softmax at each position of each sampled path, targets
    floored at 1e-8 and renormalized."""
    space, trie = _gaussian(trie_tokenizer, decimals=2, max_bins=200)
    model = tiny_model(tokenizer, arch, seed=1)
    prompt_ids = chat.prompt_ids(PROMPT)
    got = logit_kl(model, prompt_ids, trie, num_paths=4, seed=7)
    _, offsets, ids = trie.sample_paths(4, 7)
    per_path = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        path = ids[a:b].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + path])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        t_off, t_tok, t_q = trie.targets_along(ids[a:b])
        kls = []
        for k in range(len(path)):
            q = np.maximum(t_q[t_off[k] : t_off[k + 1]], 1e-8)
            q = q / q.sum()
            lp = logp[len(prompt_ids) - 1 + k, t_tok[t_off[k] : t_off[k + 1]]].numpy()
            kls.append(float(np.sum(q * (np.log(q) - lp))))
        per_path.append(np.mean(kls))
    assert got == pytest.approx(float(np.mean(per_path)), rel=1e-5, abs=1e-6)


def _mistral(tokenizer, window):
    """A tiny random Mistral: no per-layer types, every layer slides over `window` positions."""
    config = MistralConfig(
        vocab_size=(len(tokenizer) + 15) // 16 * 16 + 16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=window,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MistralForCausalLM(config).eval()


def test_exact_pass_when_every_layer_slides(tokenizer, chat, trie_tokenizer) -> None:
    """One mask for all layers (the model takes no per-type masks), cut to the window."""
    space, trie = _gaussian(trie_tokenizer, decimals=1, max_bins=40)
    model = _mistral(tokenizer, window=8)
    prompt_ids = chat.prompt_ids(PROMPT)
    assert len(prompt_ids) > 8
    state = prefill(model, prompt_ids)
    assert attention_spans(model, state) == {None: AttentionSpan(cached=7, window=8)}
    offsets, ids = trie.value_paths()
    brute = [
        teacher_forced_logprob(model, prompt_ids, ids[offsets[i] : offsets[i + 1]].tolist())
        for i in range(len(space))
    ]
    np.testing.assert_allclose(exact_logprobs(model, prompt_ids, trie), brute, rtol=0, atol=1e-5)


def test_exact_pass_refuses_attention_it_cannot_mask(tokenizer, chat, trie_tokenizer) -> None:
    _, trie = _gaussian(trie_tokenizer)
    model = _mistral(tokenizer, window=8)
    state = prefill(model, chat.prompt_ids(PROMPT))
    model.config.layer_types = ["chunked_attention"] * 2  # Llama 4's local layers, say
    with pytest.raises(ValueError, match="supports full and sliding-window attention"):
        edge_logprobs(model, state, TrieLayout.from_trie(trie))
