"""Sampling from a causal LM: pure ancestral sampling sharing one prompt prefill, and greedy
decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from calibft.lm.decode import PromptState, lm_head_logits, run_decoder


def draw_tokens(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits`, drawn from its full softmax by inverting the row's CDF at one
    uniform draw. On a CPU this is ~5x faster than `torch.multinomial` at 250 x 49152 (which was
    a fifth of all sampling time); the CDF is summed in float64 so rare tokens keep their share."""
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum_(dim=-1)
    uniform = torch.rand((len(cdf), 1), generator=generator, dtype=cdf.dtype, device=cdf.device)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)[:, 0]
    return tokens.clamp_(max=cdf.shape[-1] - 1)  # u * total rounding up to total: the last token


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

    Each batch starts from a copy of the prompt's KV cache repeated along the batch (the prompt is
    never recomputed); finished sequences leave the batch, so later steps cost only what is still
    generating. Sampling is pure ancestral sampling from the full softmax (temperature 1, top-p 1,
    no top-k), drawn from a generator seeded by `seed`.
    """
    device = state.last_hidden.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ends = torch.tensor(sorted(set(end_ids)), device=device)
    root_logits = lm_head_logits(model, state.last_hidden[None])
    out: list[list[int]] = []
    bar = tqdm(total=n, desc="samples", unit="seq", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        rows: list[list[int]] = [[] for _ in range(size)]
        alive = torch.arange(size)
        cache = None
        logits = root_logits.expand(size, -1)
        for step in range(max_new_tokens):
            tokens = draw_tokens(logits, generator)
            finished = torch.isin(tokens, ends)
            for row, token, done in zip(
                alive.tolist(), tokens.tolist(), finished.tolist(), strict=True
            ):
                if not done:
                    rows[row].append(token)
            keep = ~finished
            if step == max_new_tokens - 1 or not bool(keep.any()):
                break
            if cache is None:
                cache = state.fresh_cache()
                cache.batch_repeat_interleave(size)
            if not bool(keep.all()):
                cache.batch_select_indices(keep.nonzero()[:, 0].to(device))
                alive, tokens = alive[keep.cpu()], tokens[keep]
            positions = torch.full((len(alive), 1), state.length + step, device=device)
            step_out = run_decoder(model, cache, input_ids=tokens[:, None], position_ids=positions)
            hidden = step_out.last_hidden_state[:, -1]
            logits = lm_head_logits(model, hidden)
        out.extend(rows)
        bar.update(size)
    bar.close()
    return out


@torch.inference_mode()
def greedy_completion(
    model: Any, state: PromptState, *, end_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """The most probable next token, step after step, up to the first end token (excluded)."""
    ends = set(end_ids)
    device = state.last_hidden.device
    cache = state.fresh_cache()
    hidden = state.last_hidden[None]
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(lm_head_logits(model, hidden).argmax(dim=-1)[0])
        if token in ends:
            break
        out.append(token)
        if step == max_new_tokens - 1:
            break
        positions = torch.tensor([[state.length + step]], device=device)
        ids = torch.tensor([[token]], device=device)
        hidden = run_decoder(model, cache, input_ids=ids, position_ids=positions).last_hidden_state[
            :, -1
        ]
    return out
