"""The sampler's pieces: counter-based uniforms, the two-stage float32 draw, memory-sized batches,
and samples that depend on the seed only (not on batching or compaction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from tiny_models import tiny_model

import calibft.lm.sample as sampling
from calibft.lm.decode import prefill
from calibft.lm.sample import (
    BLOCK,
    draw_tokens,
    kv_batch_size,
    mix64,
    row_keys,
    sample_completions,
    step_uniforms,
)

MASK = (1 << 64) - 1


def splitmix64_finalizer(z: int) -> int:
    """The reference, on Python integers mod 2^64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), min_size=1))
def test_mix64_is_splitmix64_mod_2_64(values) -> None:
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & MASK for g in got] == [splitmix64_finalizer(v & MASK) for v in values]


def test_uniforms_are_uniform_and_keyed() -> None:
    keys = row_keys(7, torch.arange(20000))
    u = torch.cat([step_uniforms(keys, step) for step in range(3)], dim=1).numpy()
    assert ((u >= 0) & (u < 1)).all()
    for column in u.T:
        assert stats.kstest(column, "uniform").pvalue > 1e-3
    assert np.abs(np.corrcoef(u.T) - np.eye(6)).max() < 0.03  # steps and draws uncorrelated
    # A row's uniforms depend on (seed, row, step) only.
    again = step_uniforms(row_keys(7, torch.tensor([19999, 5])), 2).numpy()
    np.testing.assert_array_equal(again, u[[19999, 5], 4:6])
    assert not np.array_equal(step_uniforms(row_keys(8, torch.arange(2)), 0).numpy(), u[:2, :2])


def _draw_counts(logits: torch.Tensor, n: int, seed: int) -> np.ndarray:
    counts = np.zeros(len(logits), dtype=np.int64)
    for start in range(0, n, 20000):  # chunks keep the [rows, V] blocks small
        rows = torch.arange(start, min(n, start + 20000))
        uniforms = step_uniforms(row_keys(seed, rows), 0)
        tokens = draw_tokens(logits.expand(len(rows), -1), uniforms)
        counts += np.bincount(tokens.numpy(), minlength=len(logits))
    return counts


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    big = expected >= 5  # categories too rare for the approximation pooled into one
    f_obs = np.append(counts[big], counts[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    keep = f_exp > 0
    return stats.chisquare(f_obs[keep], f_exp[keep] * f_obs[keep].sum() / f_exp[keep].sum()).pvalue


def test_drawn_tokens_follow_the_softmax() -> None:
    """A vocabulary smaller than one block (the partial block alone)."""
    logits = torch.tensor([2.0, 0.0, -float("inf"), -1.0, -6.0, 1.0])
    counts = _draw_counts(logits, 200_000, seed=3)
    assert counts[2] == 0  # zero probability is never drawn
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    assert _chi_square_p(counts, probs) > 1e-3
    assert counts[4] > 10  # a rare token (p = 2.2e-4: ~43 expected) keeps its share


def test_drawn_tokens_follow_the_softmax_across_blocks() -> None:
    """Several full blocks and a partial one; the test rejects a law at temperature 1.1."""
    vocab = 2 * BLOCK + 88
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits[[3, BLOCK, 2 * BLOCK + 87]] = -float("inf")  # in each block, the tail's last
    logits[BLOCK + 5] = 9.0  # one block holds most of the mass
    counts = _draw_counts(logits, 200_000, seed=4)
    assert counts[[3, BLOCK, 2 * BLOCK + 87]].sum() == 0
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    assert _chi_square_p(counts, probs) > 1e-3
    hotter = torch.softmax(logits.double() / 1.1, dim=-1).numpy()
    assert _chi_square_p(counts, hotter) < 1e-4


@pytest.fixture(scope="module")
def model_and_state(tokenizer, chat):
    model = tiny_model(tokenizer)
    return model, prefill(model, chat.prompt_ids("Name a random city."))


def test_samples_depend_on_the_seed_only(model_and_state, monkeypatch) -> None:
    """Same seed, same samples, whatever the batch size, the memory-derived cap or how often
    finished rows are compacted; another seed, other samples."""
    model, state = model_and_state
    ends = list(range(0, model.config.vocab_size, 5))  # a fifth of the vocabulary ends a row
    kwargs = dict(end_ids=ends, max_new_tokens=8)
    reference = sample_completions(model, state, 30, seed=5, batch_size=30, **kwargs)
    assert len(reference) == 30 and all(len(ids) <= 8 for ids in reference)
    assert not set(ends) & {t for ids in reference for t in ids}
    lengths = {len(ids) for ids in reference}
    assert len(lengths) > 2  # rows finish at different steps: compaction is exercised
    assert sample_completions(model, state, 30, seed=5, batch_size=7, **kwargs) == reference
    assert sample_completions(model, state, 30, seed=6, batch_size=30, **kwargs) != reference
    monkeypatch.setattr(sampling, "compact_every", lambda device: 3)
    assert sample_completions(model, state, 30, seed=5, batch_size=30, **kwargs) == reference
    monkeypatch.setattr(sampling, "free_memory", lambda device: 0)  # one row per batch
    assert sample_completions(model, state, 30, seed=5, batch_size=30, **kwargs) == reference


def test_batch_size_follows_free_memory(model_and_state, monkeypatch) -> None:
    model, state = model_and_state
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 8 * 4  # K, V float32
    assert config.hidden_size // config.num_attention_heads == 8
    per_row = per_token * (state.length + 10) + 16 * config.vocab_size
    monkeypatch.setattr(sampling, "free_memory", lambda device: int(2 * 37.5 * per_row))
    assert kv_batch_size(state, config.vocab_size, 10, 250) == 37
    assert kv_batch_size(state, config.vocab_size, 10, 20) == 20
    monkeypatch.setattr(sampling, "free_memory", lambda device: 0)
    assert kv_batch_size(state, config.vocab_size, 10, 250) == 1


def test_samples_equal_rows_drawn_one_at_a_time(model_and_state, monkeypatch) -> None:
    """Merging rows that share a prefix changes nothing: each row equals the same row decoded
    alone (batch 1, its own cache) with its own uniforms; and the merge does save work."""
    model, state = model_and_state
    ends = list(range(0, model.config.vocab_size, 7))
    n, steps = 24, 6
    sizes = []
    real_decoder = sampling.run_decoder

    def counting_decoder(model, cache, **inputs):
        sizes.append(len(inputs["input_ids"]))
        return real_decoder(model, cache, **inputs)

    monkeypatch.setattr(sampling, "run_decoder", counting_decoder)
    got = sample_completions(
        model, state, n, seed=9, end_ids=ends, max_new_tokens=steps, batch_size=n
    )
    firsts = [ids[0] for ids in got if ids]
    assert sizes[0] == len(set(firsts)) < len(firsts)  # one sequence per distinct first token
    monkeypatch.setattr(sampling, "run_decoder", real_decoder)
    keys = row_keys(9, torch.arange(n))
    for row in range(n):
        assert got[row] == _decoded_alone(model, state, keys[row : row + 1], ends, steps)


@torch.inference_mode()
def _decoded_alone(model, state, key, ends, steps) -> list[int]:
    """One row's ancestral sample, decoded on its own: batch 1, its own cache."""
    cache, hidden, alone = state.fresh_cache(), state.last_hidden[None], []
    for step in range(steps):
        logits = sampling.lm_head_logits(model, hidden)
        token = int(draw_tokens(logits, step_uniforms(key, step))[0])
        if token in ends:
            break
        alone.append(token)
        position = torch.tensor([[state.length + step]])
        out = sampling.run_decoder(
            model, cache, input_ids=torch.tensor([[token]]), position_ids=position
        )
        hidden = out.last_hidden_state[:, -1]
    return alone
