"""Sampling from a causal LM: pure ancestral sampling sharing one prompt prefill, and greedy
decoding, both without a host synchronization per token.

Every random number comes from a counter-based hash of (seed, row, step): row i of a request
draws the same uniforms whatever the batch it runs in, how often finished rows are dropped, or
the device. So batch sizes derived from free memory never change the samples (beyond the float
rounding of batched matrix products), and neither will batching rows of several requests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from calibft.lm.decode import PromptState, lm_head_logits, run_decoder

BLOCK = 256
"""Vocabulary entries per block of the two-stage draw (see `draw_tokens`)."""

MEMORY_SHARE = 0.5
"""Share of the free memory that the sampler's KV cache and logits may take."""


def compact_every(device: torch.device) -> int:
    """Decode steps between two compactions of finished rows (each one host synchronization).
    On a CPU a synchronization costs nothing and a finished row's step costs a full row of
    compute, so rows leave at once; on an accelerator every 8 steps keeps the queue full."""
    return 1 if device.type == "cpu" else 8


# ---- counter-based uniforms ------------------------------------------------------------------


def _int64(value: int) -> int:
    """`value` mod 2^64 as a signed 64-bit integer (what an int64 tensor holds)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 lanes (torch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 lanes, wrapping mod 2^64: a bijection whose outputs for
    consecutive inputs pass BigCrush (Steele, Lea and Flood, 2014)."""
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return z ^ _shift(z, 31)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row index of a request seeded by `seed` (int64 [len(rows)])."""
    seed_key = mix64(torch.tensor(_int64(seed), dtype=torch.int64) + _GOLDEN)
    return mix64(seed_key.to(rows.device) + (rows.to(torch.int64) + 1) * _GOLDEN)


def step_uniforms(keys: torch.Tensor, step: int, count: int = 2) -> torch.Tensor:
    """`count` uniforms in [0, 1) per key for decode step `step`, float64 [len(keys), count]:
    the top 53 bits of a hash of (key, step, j)."""
    counters = torch.arange(count, device=keys.device, dtype=torch.int64) + (step * count + 1)
    bits = mix64(keys[:, None] + counters * _GOLDEN)
    return _shift(bits, 11).double() * 2.0**-53


# ---- the draw --------------------------------------------------------------------------------


def _pick(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of non-negative `weights` [B, K] (float64), the index whose cumulative interval
    holds `uniform` [B] times the row's total; never an entry of weight 0."""
    cdf = weights.cumsum(dim=-1)
    index = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(dim=-1)
    # u * total can round up to total: fall back to the last entry with weight.
    last = (weights > 0) * torch.arange(weights.shape[-1], device=weights.device)
    return torch.minimum(index, last.amax(dim=-1))


def draw_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row, drawn from the full softmax of its `logits` row (`rows[i]`: the row of
    `logits` [N, V] that draw i reads, default i) with two uniforms per draw (`uniforms`
    [R, 2]): a block of BLOCK tokens by the blocks' masses, then a token within it. The
    vocabulary-wide work is float32 (exp and block sums, whose errors are relative, so rare
    tokens keep their share) and done once per logits row however many draws read it; only the
    [R, V / BLOCK] and [R, BLOCK] cumulative sums run in float64. On a CPU this is ~2x faster
    than one float64 CDF over the vocabulary."""
    logits = logits.float()
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # unnormalized softmax
    count, vocab = weights.shape
    if rows is None:
        rows = torch.arange(count, device=logits.device)
    full = vocab - vocab % BLOCK
    masses = weights[:, :full].view(count, -1, BLOCK).sum(dim=-1)
    if full < vocab:
        masses = torch.cat([masses, weights[:, full:].sum(dim=-1, keepdim=True)], dim=-1)
    block = _pick(masses.double()[rows], uniforms[:, 0])
    columns = block[:, None] * BLOCK + torch.arange(BLOCK, device=logits.device)
    flat = rows[:, None] * vocab + columns.clamp(max=vocab - 1)
    inside = weights.view(-1)[flat].double() * (columns < vocab)
    return block * BLOCK + _pick(inside, uniforms[:, 1])


# ---- memory ----------------------------------------------------------------------------------


def _cache_bytes(cache: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical pages free
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_batch_size(state: PromptState, vocab: int, max_new_tokens: int, requested: int) -> int:
    """Sequences per sampling batch: `requested`, or fewer when their KV cache (the prompt's bytes
    per token times prompt plus new tokens; sliding layers make this an overestimate) and
    their float32 logits would take more than MEMORY_SHARE of the free memory. At least 1."""
    per_token = _cache_bytes(state.cache) / state.length
    per_row = per_token * (state.length + max_new_tokens) + 4 * 4 * vocab
    budget = MEMORY_SHARE * free_memory(state.last_hidden.device)
    return max(1, min(requested, int(budget // per_row)))


# ---- decoding --------------------------------------------------------------------------------


def _first_end(tokens: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per row of `tokens` [B, T], the index of its first end token (T if none)."""
    ended = torch.isin(tokens, ends)
    return torch.where(ended.any(dim=1), ended.int().argmax(dim=1), tokens.shape[1])


def _completions(tokens: torch.Tensor, ends: torch.Tensor) -> list[list[int]]:
    """Rows of the device buffer `tokens` up to their first end token, in one transfer."""
    lengths = _first_end(tokens, ends).tolist()
    return [row[:length] for row, length in zip(tokens.tolist(), lengths, strict=True)]


@torch.inference_mode()
def sample_completions(
    model: Any,
    state: PromptState,
    n: int,
    *,
    seed: int,
    end_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> list[list[int]]:
    """`n` independent completions sharing one prompt prefill, up to the first end token.

    Each batch (at most `batch_size` sequences, fewer if the KV cache would not fit in memory,
    see `kv_batch_size`) starts from the prompt's KV cache (the prompt is never recomputed).
    Tokens and finished flags stay on the device. Every `compact_every` steps (and at the first)
    finished rows leave the batch and rows with the same prefix so far merge into one sequence
    (many samples share their first tokens), so a step costs only the distinct prefixes still
    generating. Sampling is pure ancestral sampling from the full softmax (temperature 1, top-p
    1, no top-k), row i's draws keyed by (`seed`, i, step), so the samples do not depend on the
    batching.
    """
    root_logits = lm_head_logits(model, state.last_hidden[None])
    device = root_logits.device  # the LM head's (under a device_map, maybe not the prompt's)
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    vocab = root_logits.shape[-1]
    size = kv_batch_size(state, vocab, max_new_tokens, batch_size)
    every = compact_every(device)
    out: list[list[int]] = []
    bar = tqdm(total=n, desc="samples", unit="seq", disable=not progress, leave=False)
    for start in range(0, n, size):
        count = min(size, n - start)
        keys = row_keys(seed, torch.arange(start, start + count, device=device))
        tokens = torch.full((count, max_new_tokens), -1, dtype=torch.long, device=device)
        done = torch.zeros(count, dtype=torch.bool, device=device)
        alive = torch.arange(count, device=device)  # batch rows still decoding
        cache = state.fresh_cache()  # one sequence per distinct prefix; at first the prompt
        logits = root_logits  # [sequences, V]
        sequence = torch.zeros(count, dtype=torch.long, device=device)  # of each alive row
        one_each = False  # whether alive row i is sequence i (no gather needed)
        for step in range(max_new_tokens):
            drawn = draw_tokens(logits, step_uniforms(keys, step), None if one_each else sequence)
            tokens[alive, step] = drawn
            done[alive] |= torch.isin(drawn, ends)
            if step == max_new_tokens - 1:
                break
            if step % every == 0:  # the one host synchronization: compaction and merging
                keep = (~done[alive]).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                alive, drawn, keys = alive[keep], drawn[keep], keys[keep]
                prefixes, sequence = torch.unique(
                    sequence[keep] * vocab + drawn, return_inverse=True
                )
                inputs = prefixes % vocab
                cache.batch_select_indices(prefixes // vocab)  # a parent per new sequence
                one_each = False
            else:  # no synchronization: every row continues as its own sequence
                if not one_each:
                    cache.batch_select_indices(sequence)
                inputs = drawn
                sequence = torch.arange(len(alive), device=device)
                one_each = True
            positions = torch.full((len(inputs), 1), state.length + step, device=device)
            step_out = run_decoder(model, cache, input_ids=inputs[:, None], position_ids=positions)
            logits = lm_head_logits(model, step_out.last_hidden_state[:, -1])
        out.extend(_completions(tokens, ends))
        bar.update(count)
    bar.close()
    return out


@torch.inference_mode()
def greedy_completion(
    model: Any, state: PromptState, *, end_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """The most probable next token, step after step, up to the first end token (excluded)."""
    device = state.last_hidden.device
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    every = compact_every(device)
    cache = state.fresh_cache()
    tokens = torch.full((1, max_new_tokens), -1, dtype=torch.long, device=device)
    hidden = state.last_hidden[None]
    for step in range(max_new_tokens):
        token = lm_head_logits(model, hidden).argmax(dim=-1)
        tokens[:, step] = token
        if step == max_new_tokens - 1:
            break
        if (step + 1) % every == 0 and bool(torch.isin(tokens[0, : step + 1], ends).any()):
            break
        positions = torch.full((1, 1), state.length + step, device=device)
        step_out = run_decoder(model, cache, input_ids=token[:, None], position_ids=positions)
        hidden = step_out.last_hidden_state[:, -1]
    return _completions(tokens, ends)[0]
