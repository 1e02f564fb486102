"""Generation for several prompts at once: left-padded prompts prefilled in one pass, then greedy
or sampled decoding of all their rows together (the runner's batches of items, issue 20).

Sampled rows draw the uniforms `calibft.lm.sample` keys by (seed, row, step), each prompt with
its own seed, so a prompt's samples do not depend on what else is in its batch (beyond the float
rounding of batched matrix products); greedy rows take the argmax. Rows with the same prefix so
far run as one sequence, as in `sample_completions`; rows of different prompts never merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from calibft.lm.decode import CACHE_FIELD, lm_head_logits, model_device, prefill, run_decoder
from calibft.lm.sample import (
    MEMORY_SHARE,
    _completions,
    compact_every,
    draw_tokens,
    free_memory,
    row_keys,
    sample_completions,
    step_uniforms,
)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of KV cache one token takes (every layer's keys and values, the model's dtype)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * itemsize


def rows_that_fit(model: Any, tokens_per_row: int, requested: int) -> int:
    """Rows per decoding pass: `requested`, or fewer when their KV cache and float32 logits would
    take more than MEMORY_SHARE of the free memory of the model's device. At least 1."""
    vocab = model.get_output_embeddings().weight.shape[0]
    per_row = kv_bytes_per_token(model) * tokens_per_row + 4 * 4 * vocab
    budget = MEMORY_SHARE * free_memory(model_device(model))
    return max(1, min(requested, int(budget // per_row)))


@torch.inference_mode()
def generate_many(
    model: Any,
    prompts: Sequence[Sequence[int]],
    counts: Sequence[int],
    seeds: Sequence[int] | None,
    *,
    end_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
) -> list[list[list[int]]]:
    """Per prompt, its `counts[i]` completions: sampled with `seeds[i]` (row j of prompt i draws
    what `sample_completions(..., seed=seeds[i])` row j draws), or greedy with `seeds` None
    (counts all 1). Prompts go through in groups of at most `batch_size` rows (fewer when memory
    is short); a prompt with more rows than a group holds is sampled alone."""
    if seeds is None and any(count != 1 for count in counts):
        raise ValueError("greedy decoding gives one completion per prompt")
    out: list[list[list[int]] | None] = [None] * len(prompts)
    longest = max(map(len, prompts), default=0)
    size = rows_that_fit(model, longest + max_new_tokens, batch_size)
    group: list[int] = []
    for index, count in enumerate(counts):
        if count > size:  # the one-prompt sampler splits its rows itself
            assert seeds is not None
            state = prefill(model, list(prompts[index]))
            out[index] = sample_completions(
                model,
                state,
                count,
                seed=seeds[index],
                end_ids=end_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            continue
        if sum(counts[i] for i in group) + count > size:
            _run_group(model, prompts, counts, seeds, group, out, end_ids, max_new_tokens)
            group = []
        group.append(index)
    if group:
        _run_group(model, prompts, counts, seeds, group, out, end_ids, max_new_tokens)
    return out  # type: ignore[return-value]


def _run_group(
    model: Any,
    prompts: Sequence[Sequence[int]],
    counts: Sequence[int],
    seeds: Sequence[int] | None,
    group: Sequence[int],
    out: list[list[list[int]] | None],
    end_ids: Sequence[int],
    max_new_tokens: int,
) -> None:
    distinct = list(dict.fromkeys(tuple(prompts[i]) for i in group))  # a prompt prefilled once
    device = model_device(model)
    cache, hidden, lengths, pads = _prefill_padded(model, distinct, device)
    logits = lm_head_logits(model, hidden)  # [sequences, V], on the LM head's device
    device = logits.device
    sequence = torch.tensor(
        [distinct.index(tuple(prompts[i])) for i in group for _ in range(counts[i])],
        device=device,
    )
    keys = None
    if seeds is not None:
        keys = torch.cat(
            [row_keys(seeds[i], torch.arange(counts[i], device=device)) for i in group]
        )
    rows = _decode(
        model,
        cache,
        logits,
        lengths.to(device),
        pads.to(device),
        sequence,
        keys,
        end_ids,
        max_new_tokens,
    )
    start = 0
    for i in group:
        out[i] = rows[start : start + counts[i]]
        start += counts[i]


def _prefill_padded(
    model: Any, prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder pass over `prompts` left-padded to the longest: the KV cache, each prompt's
    last hidden state [P, H], lengths [P] and left pads [P]."""
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    pads = width - lengths
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
    inputs: dict[str, Any] = {"input_ids": ids.to(device)}
    if int(pads.max()) > 0:  # without padding the pass is the one-prompt prefill's
        mask = torch.arange(width)[None] >= pads[:, None]
        inputs["attention_mask"] = mask.long().to(device)
        inputs["position_ids"] = (torch.arange(width)[None] - pads[:, None]).clamp(min=0).to(device)
    out = run_decoder(model, None, **inputs)
    return getattr(out, CACHE_FIELD), out.last_hidden_state[:, -1], lengths, pads


def _decode(
    model: Any,
    cache: Any,
    logits: torch.Tensor,
    lengths: torch.Tensor,
    pads: torch.Tensor,
    sequence: torch.Tensor,
    keys: torch.Tensor | None,
    end_ids: Sequence[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """Decode every row (`sequence[r]`: the prompt sequence row r continues; `keys`: its draw
    keys, None for greedy) up to its first end token; the loop of `sample_completions` with a
    padding mask and per-sequence positions."""
    device = logits.device
    ends = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
    vocab = logits.shape[-1]
    count = len(sequence)
    width = int((lengths + pads).max())
    padded = bool(pads.any())
    every = compact_every(device)
    tokens = torch.full((count, max_new_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(count, dtype=torch.bool, device=device)
    alive = torch.arange(count, device=device)
    one_each = False
    for step in range(max_new_tokens):
        if keys is None:
            drawn = logits.argmax(dim=-1)
            drawn = drawn if one_each else drawn[sequence]
        else:
            drawn = draw_tokens(logits, step_uniforms(keys, step), None if one_each else sequence)
        tokens[alive, step] = drawn
        done[alive] |= torch.isin(drawn, ends)
        if step == max_new_tokens - 1:
            break
        if step % every == 0:  # the one host synchronization: compaction and merging
            keep = (~done[alive]).nonzero()[:, 0]
            if len(keep) == 0:
                break
            alive, drawn = alive[keep], drawn[keep]
            keys = None if keys is None else keys[keep]
            prefixes, sequence = torch.unique(sequence[keep] * vocab + drawn, return_inverse=True)
            parents, inputs = prefixes // vocab, prefixes % vocab
            one_each = False
        else:  # no synchronization: every row continues as its own sequence
            parents = None if one_each else sequence
            inputs = drawn
            sequence = torch.arange(len(alive), device=device)
            one_each = True
        if parents is not None:
            cache.batch_select_indices(parents.to(model_device(model)))
            lengths, pads = lengths[parents], pads[parents]
        step_inputs: dict[str, Any] = {
            "input_ids": inputs[:, None],
            "position_ids": (lengths + step)[:, None],
        }
        if padded:
            columns = torch.arange(width + step + 1, device=device)
            step_inputs["attention_mask"] = (columns[None] >= pads[:, None]).long()
        step_out = run_decoder(model, cache, **step_inputs)
        logits = lm_head_logits(model, step_out.last_hidden_state[:, -1])
    return _completions(tokens, ends)
