"""Tokenized tries and next-token targets (docs/method.md §5).

Each value's trie path must be exactly what the Hugging Face tokenizer produces for the rendered
completion (`tokenizer(chat prefix + value + end token)` minus the prefix's ids); the CSR arrays
must be a well-formed breadth-first trie whose rows equal q(v | p) of the dictionary reference in
tests/reference.py; path products must give back the masses."""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ReferenceTrie
from scipy import stats
from tiny_models import tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from calibft import _core
from calibft.assets import llama3_tokenizer, qwen3_tokenizer
from calibft.lm.load import load_tokenizer
from calibft.splits import splits
from calibft.targets.numeric import build_output_space, build_output_spaces, space_from_values
from calibft.targets.trie import (
    _REFERENCE_PROMPT,
    TrieTokenizer,
    build_spaces_and_tries,
    build_trie,
    build_trie_from_ids,
    build_tries,
)

TOL = 1e-9


@cache
def trie_tokenizer(name: str) -> TrieTokenizer:
    hf = {
        "tiny": tiny_tokenizer,
        "smollm2": lambda: load_tokenizer("smollm2-135m"),
        "qwen3": qwen3_tokenizer,
        "llama3": llama3_tokenizer,
    }[name]()
    return TrieTokenizer.from_hf(hf)


@lru_cache(maxsize=1)
def train_specs():
    return splits("full_grid")["train"]


# ---- the oracle: Hugging Face tokenization of the rendered completion ---------------------------


def hf_completion_ids(tok: TrieTokenizer, values, prompt: str) -> list[list[int]]:
    """docs/method.md §5: ids of `chat prefix + value + end token` after the prefix's ids."""
    prefix = tok.chat.render(prompt)
    prefix_ids = tok.chat.prompt_ids(prompt)
    texts = [prefix + v + tok.chat.end_token for v in values]
    out = []
    for value, ids in zip(values, tok.hf(texts, add_special_tokens=False)["input_ids"]):
        ids = list(ids)
        assert ids[: len(prefix_ids)] == prefix_ids, value
        out.append(ids[len(prefix_ids) :])
    return out


def flatten(paths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in paths], out=offsets[1:])
    return offsets, np.asarray([t for p in paths for t in p], dtype=np.int32)


def rows(offsets: np.ndarray, flat: np.ndarray) -> list[list[int]]:
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


# ---- structural checks -------------------------------------------------------------------------


def check_csr(trie) -> None:
    n = trie.num_nodes
    off, tok, prob, child = trie.node_offsets, trie.child_tokens, trie.child_probs, trie.child_nodes
    assert (off.dtype, tok.dtype, prob.dtype, child.dtype) == (
        np.int64,
        np.int32,
        np.float64,
        np.int32,
    )
    num_edges = tok.size
    assert off.shape == (n + 1,) and off[0] == 0 and off[-1] == num_edges
    assert np.all(np.diff(off) >= 0)
    assert prob.shape == child.shape == (num_edges,)
    # A tree: every node but the root has exactly one incoming edge, and child ids are in range.
    assert num_edges == n - 1
    assert np.all((child >= 1) & (child < n))
    np.testing.assert_array_equal(np.sort(child), np.arange(1, n))
    assert np.all((prob >= 0) & (prob <= 1 + TOL))
    parents, depths = trie.parents(), trie.depths()
    assert parents.shape == depths.shape == (n,) and parents[0] == 0 and depths[0] == 0
    for u in range(n):
        a, b = off[u], off[u + 1]
        if a == b:
            continue
        assert np.all(np.diff(tok[a:b]) > 0)  # children sorted by token, no duplicates
        assert abs(prob[a:b].sum() - 1.0) <= TOL
        assert np.all(parents[child[a:b]] == u)
        assert np.all(depths[child[a:b]] == depths[u] + 1)
    # Breadth-first numbering: depths never decrease.
    assert np.all(np.diff(depths) >= 0)


def walk(trie, path) -> tuple[list[int], float]:
    """Nodes visited from the root along `path` in the CSR arrays, and the product of q."""
    off, tok, prob, child = trie.node_offsets, trie.child_tokens, trie.child_probs, trie.child_nodes
    node, product, nodes = 0, 1.0, [0]
    for token in path:
        a, b = off[node], off[node + 1]
        j = a + int(np.searchsorted(tok[a:b], token))
        assert j < b and tok[j] == token, f"token {token} missing below node {node}"
        product *= prob[j]
        node = int(child[j])
        nodes.append(node)
    return nodes, product


def check_trie(trie, expected_paths: list[list[int]], masses: np.ndarray, end_id: int) -> None:
    """Full check of `trie` against the expected token paths (end token included) and masses."""
    check_csr(trie)
    masses = np.asarray(masses, dtype=np.float64)
    assert trie.num_values == len(expected_paths) == masses.size
    offsets, ids = trie.value_paths()
    assert offsets.dtype == np.int64 and ids.dtype == np.int32
    assert rows(offsets, ids) == expected_paths
    np.testing.assert_allclose(trie.value_probs, masses, rtol=0, atol=TOL)

    off, csr_tok, csr_prob = trie.node_offsets, trie.child_tokens, trie.child_probs
    reference = ReferenceTrie(expected_paths, masses)
    leaves = set()
    for path, mass in zip(expected_paths, masses):
        assert path[-1] == end_id and end_id not in path[:-1]
        nodes, product = walk(trie, path)
        assert abs(product - mass) <= TOL
        leaf = nodes[-1]
        assert off[leaf] == off[leaf + 1]  # the end token leads to a leaf
        leaves.add(leaf)
        # targets_along gives the CSR row of every node on the path ...
        t_off, t_tok, t_prob = trie.targets_along(np.asarray(path, dtype=np.int32))
        assert (t_off.dtype, t_tok.dtype, t_prob.dtype) == (np.int64, np.int32, np.float64)
        assert t_off.shape == (len(path) + 1,) and t_off[0] == 0
        for k, node in enumerate(nodes[:-1]):
            a, b = off[node], off[node + 1]
            got_tok, got_prob = t_tok[t_off[k] : t_off[k + 1]], t_prob[t_off[k] : t_off[k + 1]]
            assert np.array_equal(got_tok, csr_tok[a:b]) and np.array_equal(got_prob, csr_prob[a:b])
            # ... and that row is q(v | p) = mass(p·v) / mass(p) of the dictionary reference.
            prefix = tuple(path[:k])
            assert got_tok.tolist() == sorted(reference.children[prefix])
            if reference.prefix_mass[prefix] > 0:
                expected = list(reference.targets(prefix).values())
            else:  # a massless subtree: spread evenly
                expected = [1.0 / len(got_prob)] * len(got_prob)
            assert np.abs(got_prob - expected).max() <= TOL, (path, k)
    # Distinct values have distinct paths, and every leaf is some value's end.
    assert len(leaves) == len(expected_paths)
    assert leaves == {u for u in range(trie.num_nodes) if off[u] == off[u + 1]}


def check_space_trie(trie, space, tok: TrieTokenizer) -> None:
    expected = hf_completion_ids(tok, space.values, space.prompt)
    check_trie(trie, expected, space.probs, tok.chat.end_token_id)
    # The paths read back as the values.
    for value, path in zip(space.values, expected):
        assert tok.hf.decode(path[:-1]) == value


def assert_same_trie(a, b) -> None:
    assert a.num_nodes == b.num_nodes and a.num_values == b.num_values
    for name in ("node_offsets", "child_tokens", "child_probs", "child_nodes", "value_probs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for x, y in zip(a.value_paths(), b.value_paths()):
        np.testing.assert_array_equal(x, y)


# ---- random spaces from the training grid ------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(train_specs()) - 1),
    decimals=st.integers(0, 5),
    max_bins=st.integers(2, 300),
)
def test_trie_of_random_training_space(name, index, decimals, max_bins):
    tok = trie_tokenizer(name)
    spec = train_specs()[index]
    space = build_output_space(spec.family, spec.params, decimals=decimals, max_bins=max_bins)
    trie = build_trie(space, tok)
    check_space_trie(trie, space, tok)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "qwen3", "llama3"])
def test_real_tokenizers_on_paper_sized_spaces(name):
    """d = 5 with negative, fractional and multi-digit values, and an integer family."""
    tok = trie_tokenizer(name)
    for family, params, decimals, max_bins in [
        ("gaussian", {"mu": -3.0, "sigma": 40.0}, 5, 1001),
        ("negative_binomial", {"r": 5.0, "p": 0.05}, 5, 1001),
        ("uniform", {"a": -0.01, "b": 0.01}, 5, 257),
    ]:
        space = build_output_space(family, params, decimals=decimals, max_bins=max_bins)
        check_space_trie(build_trie(space, tok), space, tok)


@pytest.mark.slow
def test_llama3_numbers_split_into_multi_digit_tokens():
    tok = trie_tokenizer("llama3")
    values = ["3.14159", "-2.71828", "1000", "0.5"]
    space = space_from_values(values, [0.4, 0.3, 0.2, 0.1])
    trie = build_trie(space, tok)
    offsets, ids = trie.value_paths()
    pieces = [tok.hf.convert_ids_to_tokens(p) for p in rows(offsets, ids)]
    eot = "<|eot_id|>"
    assert pieces[0] == ["3", ".", "141", "59", eot]
    assert pieces[2] == ["100", "0", eot]
    assert all(p[-1] == eot and len(p) < len(v) + 1 for p, v in zip(pieces[:3], values))
    # Same as the HF tokenizer after the full chat prefix (custom spaces use a reference prompt).
    expected = hf_completion_ids(tok, values, _REFERENCE_PROMPT)
    check_trie(trie, expected, space.probs, tok.chat.end_token_id)


# ---- sampling ----------------------------------------------------------------------------------


def test_sample_paths_is_seeded_and_returns_value_paths():
    tok = trie_tokenizer("tiny")
    space = build_output_space("gamma", {"alpha": 2.0, "beta": 1.0}, decimals=1, max_bins=60)
    trie = build_trie(space, tok)
    values, offsets, ids = trie.sample_paths(500, 123)
    assert (values.dtype, offsets.dtype, ids.dtype) == (np.int64, np.int64, np.int32)
    assert values.shape == (500,) and offsets.shape == (501,)
    again = trie.sample_paths(500, 123)
    for x, y in zip((values, offsets, ids), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(trie.sample_paths(500, 124)[0], values)
    all_paths = rows(*trie.value_paths())
    assert np.all((values >= 0) & (values < len(space)))
    assert rows(offsets, ids) == [all_paths[v] for v in values]
    assert trie.sample_paths(0, 1)[0].size == 0


def test_sample_frequencies_follow_the_masses():
    tok = trie_tokenizer("tiny")
    space = build_output_space("binomial", {"n": 12.0, "p": 0.3}, max_bins=1001)
    trie = build_trie(space, tok)
    n = 40_000
    values, _, _ = trie.sample_paths(n, 2024)
    counts = np.bincount(values, minlength=len(space))
    expected = space.probs * n
    # Pool the sparse upper tail so every cell expects at least 5 draws.
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3
    # A far-off law would be rejected by the same test.
    _, p_wrong = stats.chisquare(
        observed, np.roll(expected, 1) * observed.sum() / np.roll(expected, 1).sum()
    )
    assert p_wrong < 1e-6


def test_zero_mass_values_are_never_sampled():
    trie = build_trie_from_ids(
        np.array([0, 2, 4, 7], dtype=np.int64),
        np.array([1, 9, 2, 9, 2, 3, 9], dtype=np.int32),
        np.array([0.6, 0.0, 0.4]),
    )
    values, _, _ = trie.sample_paths(5000, 0)
    assert set(values.tolist()) == {0, 2}
    # The massless node below token 2 (only "2 9" would end there) still has a distribution.
    t_off, t_tok, t_prob = trie.targets_along(np.array([2, 9], dtype=np.int32))
    np.testing.assert_array_equal(t_tok[t_off[1] : t_off[2]], [3, 9])
    np.testing.assert_allclose(t_prob[t_off[1] : t_off[2]], [1.0, 0.0])


# ---- the builders agree ------------------------------------------------------------------------

# (training family, index of its grid point): continuous and integer, positive and negative values.
SPACE_SPECS = [
    ("gaussian", 0),
    ("geometric", 0),
    ("uniform", 3),
    ("beta_binomial", 1),
    ("cauchy", 2),
    ("gamma", 5),
]


def some_spaces(decimals: int = 3, max_bins: int = 200):
    specs = [[s for s in train_specs() if s.family == family][i] for family, i in SPACE_SPECS]
    spaces = build_output_spaces(specs, decimals=decimals, max_bins=max_bins)
    return spaces + [space_from_values(["-1", "0.5", "12"], [1.0, 2.0, 1.0])]


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_build_tries_equals_build_trie(name):
    tok = trie_tokenizer(name)
    spaces = some_spaces()
    tries = build_tries(spaces, tok)
    assert len(tries) == len(spaces)
    for space, trie in zip(spaces, tries):
        assert_same_trie(trie, build_trie(space, tok))
    assert build_tries([], tok) == []


@pytest.mark.slow
def test_build_trie_from_ids_agrees_with_build_trie():
    tok = trie_tokenizer("smollm2")
    for space in some_spaces(decimals=4, max_bins=300):
        prompt = space.prompt if space.family != "custom" else None
        paths = hf_completion_ids(tok, space.values, prompt or _REFERENCE_PROMPT)
        from_ids = build_trie_from_ids(*flatten(paths), space.probs)
        assert_same_trie(from_ids, build_trie(space, tok))
        # The Python encoder gives the same ids as the HF oracle.
        offsets, ids = tok.encode_values(space.values, prompt)
        assert rows(offsets, ids) == paths


def test_hf_tokenizer_and_trie_tokenizer_give_the_same_trie():
    tok = trie_tokenizer("tiny")
    space = build_output_space("laplace", {"mu": -1.0, "b": 2.0}, decimals=2, max_bins=100)
    assert_same_trie(build_trie(space, tok.hf), build_trie(space, tok))


class _NoFastBackend:
    """A tokenizer without `backend_tokenizer`, like a slow (Python) tokenizer."""

    def __init__(self, hf):
        self._hf = hf

    def __call__(self, *args, **kwargs):
        return self._hf(*args, **kwargs)

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._hf, name)


@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_tokenizers_without_fast_backend_build_the_same_tries(name):
    fast = trie_tokenizer(name)
    slow = TrieTokenizer.from_hf(_NoFastBackend(fast.hf))
    assert slow._core is None
    spaces = some_spaces(decimals=2, max_bins=80)
    for a, b in zip(build_tries(spaces, slow), build_tries(spaces, fast)):
        assert_same_trie(a, b)


def test_pipelined_builder_equals_separate_steps():
    tok = trie_tokenizer("tiny")
    specs = train_specs()[::250]
    spaces, tries = build_spaces_and_tries(specs, tok, decimals=2, max_bins=50, chunk_size=3)
    expected_spaces = build_output_spaces(specs, decimals=2, max_bins=50)
    assert [s.values for s in spaces] == [s.values for s in expected_spaces]
    for trie, space in zip(tries, expected_spaces, strict=True):
        assert_same_trie(trie, build_trie(space, tok))
    no_spaces, tries_again = build_spaces_and_tries(
        specs, tok, decimals=2, max_bins=50, keep_spaces=False
    )
    assert no_spaces == [] and len(tries_again) == len(specs)


# ---- bad input ---------------------------------------------------------------------------------


def test_tokenizer_without_any_end_token_is_rejected():
    base = tiny_tokenizer()
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, chat_template=plain)
    assert hf.eos_token is None
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=1, max_bins=10)
    with pytest.raises(ValueError, match="eos_token"):
        build_trie(space, hf)
    with pytest.raises(ValueError, match="eos_token"):
        TrieTokenizer.from_hf(hf)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"decimals": -1}, "decimals"),
        ({"decimals": _core.MAX_DECIMALS + 1}, "decimals"),
        ({"decimals": 2.5}, "decimals"),
        ({"max_bins": 1}, "max_bins"),
        ({"max_bins": _core.MAX_BINS_LIMIT + 1}, "max_bins"),
        ({"max_bins": 100.0}, "max_bins"),
    ],
)
def test_bad_grid_settings_are_rejected(kwargs, field):
    tok = trie_tokenizer("tiny")
    with pytest.raises(ValueError, match=field):
        build_spaces_and_tries(train_specs()[:2], tok, **kwargs)


def test_unknown_family_and_bad_params_are_rejected():
    tok = trie_tokenizer("tiny")
    with pytest.raises(ValueError, match="family"):
        build_spaces_and_tries([("no_such_family", {"mu": 0.0})], tok)
    with pytest.raises(ValueError, match="sigma"):
        build_spaces_and_tries([("gaussian", {"mu": 0.0, "sigma": 0.0})], tok)


def test_build_trie_from_ids_rejects_bad_arrays():
    ok_offsets = np.array([0, 2, 4], dtype=np.int64)
    ok_ids = np.array([1, 9, 2, 9], dtype=np.int32)
    ok_masses = np.array([0.5, 0.5])
    cases = [
        ((np.array([0, 2, 5]), ok_ids, ok_masses), "offsets"),
        ((np.array([0, 2]), ok_ids, ok_masses), "offsets"),
        ((np.array([0, -2, 4]), ok_ids, ok_masses), "offsets"),
        ((ok_offsets, np.array([1, 9, -2, 9]), ok_masses), "ids"),
        ((np.array([0, 1, 3]), np.array([1, 1, 9]), ok_masses), "prefix"),
        ((np.array([0, 0, 4]), ok_ids, ok_masses), "at least one token"),
        ((ok_offsets, ok_ids, np.array([0.5, np.nan])), "masses"),
        ((ok_offsets, ok_ids, np.array([0.5, -0.1])), "masses"),
        ((np.array([0]), np.zeros(0), np.zeros(0)), "offsets"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            build_trie_from_ids(*args)


def test_core_rejects_paths_outside_the_trie_and_bad_tokenizer_setup():
    tok = trie_tokenizer("tiny")
    space = build_output_space("poisson", {"lambda": 2.0}, max_bins=20)
    trie = build_trie(space, tok)
    path = rows(*trie.value_paths())[0]
    with pytest.raises(ValueError, match="not in the trie"):
        trie.targets_along(np.asarray(path[:-1] + [path[-1] + 1], dtype=np.int32))
    with pytest.raises(ValueError, match="end_token_id"):
        _core.CompletionTokenizer(tok.hf.backend_tokenizer.to_str(), 10**6)
    with pytest.raises(ValueError, match="contexts"):
        _core.build_tries([space.core, space.core], tok._core, ["<|im_start|>assistant\n"])
