"""Log-likelihoods under a causal LM: continuations of one shared context, and long token
sequences scored in overlapping windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from calibft.lm.decode import PromptState, lm_head_logits, model_device, run_decoder


@torch.inference_mode()
def continuation_logprobs(
    model: Any, state: PromptState, continuations: Sequence[Sequence[int]], *, batch_size: int = 32
) -> list[float]:
    """log p(continuation | prompt) of each continuation, over one prefill of the prompt.

    Continuations are right-padded into batches over a copy of the prompt's KV cache; under
    causal attention a real token never sees the padding after it, so no mask is needed."""
    device = model_device(model)
    root = torch.log_softmax(lm_head_logits(model, state.last_hidden[None]).float(), dim=-1)[0]
    out: list[float] = []
    for start in range(0, len(continuations), batch_size):
        chunk = [list(c) for c in continuations[start : start + batch_size]]
        if any(not c for c in chunk):
            raise ValueError("every continuation needs at least one token")
        totals = [float(root[c[0]]) for c in chunk]
        width = max(len(c) for c in chunk) - 1
        if width > 0:
            ids = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in chunk], device=device)
            positions = (state.length + torch.arange(width, device=device)).expand(len(chunk), -1)
            cache = state.fresh_cache()
            cache.batch_repeat_interleave(len(chunk))
            hidden = run_decoder(model, cache, input_ids=ids, position_ids=positions).last_hidden_state
            logprobs = torch.log_softmax(lm_head_logits(model, hidden).float(), dim=-1)
            for row, c in enumerate(chunk):
                steps = torch.arange(len(c) - 1, device=device)
                totals[row] += float(logprobs[row, steps, torch.tensor(c[1:], dtype=torch.long, device=device)].sum())
        out.extend(totals)
    return out


def scored_windows(n_tokens: int, window: int = 2048, stride: int = 1024) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first_scored)`` over a sequence of `n_tokens` tokens such that every
    token but the first is scored exactly once, each with at least ``window - stride`` tokens of
    context when the sequence is long enough: a window covers tokens ``[start, end)`` and scores
    the predictions of tokens ``first_scored .. end-1``."""
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got window={window}, stride={stride}")
    out: list[tuple[int, int, int]] = []
    scored_until = 1  # token 0 has no context and is never scored
    start = 0
    while scored_until < n_tokens:
        end = min(start + window, n_tokens)
        out.append((start, end, scored_until))
        scored_until = end
        start += stride
    return out


@torch.inference_mode()
def rolling_nll(
    model: Any, ids: Sequence[int], *, window: int = 2048, stride: int = 1024, batch_size: int = 4
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `ids` and the number of tokens it covers (all
    but the first), scored in `scored_windows`; several windows share one forward pass."""
    device = model_device(model)
    spans = scored_windows(len(ids), window, stride)
    total = 0.0
    count = 0
    for first in range(0, len(spans), batch_size):
        group = spans[first : first + batch_size]
        width = max(end - start for start, end, _ in group)
        batch = torch.zeros((len(group), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for row, (start, end, _) in enumerate(group):
            batch[row, : end - start] = torch.tensor(ids[start:end], device=device)
            mask[row, : end - start] = 1
        hidden = run_decoder(model, None, input_ids=batch, attention_mask=mask).last_hidden_state
        for row, (start, end, scored) in enumerate(group):
            # Position p predicts token p + 1: the scored tokens' predictions sit one step earlier.
            rows = hidden[row, scored - start - 1 : end - start - 1]
            logprobs = torch.log_softmax(lm_head_logits(model, rows).float(), dim=-1)
            targets = torch.tensor(ids[scored:end], device=device)
            total -= float(logprobs.gather(1, targets[:, None]).sum())
            count += end - scored
    return total, count

