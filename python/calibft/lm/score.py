"""Log-likelihoods under a causal LM: continuations of a context (one shared context, or many
(context, continuation) requests sharing a common prefix), and documents scored in overlapping
windows (docs/benchmarks/paloma.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from calibft.lm.decode import PromptState, lm_head_logits, model_device, prefill, run_decoder

# Positions per LM-head chunk when scoring windows: a [chunk, vocab] float32 block (200 MB at a
# 49k vocabulary for 1024) instead of the whole batch's logits at once.
HEAD_CHUNK = 1024


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    state: PromptState,
    continuations: Sequence[Sequence[int]],
    *,
    scored_from: Sequence[int] | None = None,
    batch_size: int = 32,
) -> list[float]:
    """log p(continuation | prompt) of each continuation, over one prefill of the prompt.

    ``scored_from[i]`` (default 0): the first token of continuation i that is scored; the tokens
    before it are context that differs between continuations (e.g. a Winogrande option).
    Continuations are right-padded into batches over a copy of the prompt's KV cache; under
    causal attention a real token never sees the padding after it, so no mask is needed."""
    device = model_device(model)
    starts = list(scored_from) if scored_from is not None else [0] * len(continuations)
    root = torch.log_softmax(lm_head_logits(model, state.last_hidden[None]).float(), dim=-1)[0]
    out: list[float] = []
    for first in range(0, len(continuations), batch_size):
        chunk = [list(c) for c in continuations[first : first + batch_size]]
        skips = starts[first : first + batch_size]
        if any(not 0 <= s < len(c) for c, s in zip(chunk, skips, strict=True)):
            raise ValueError("every continuation needs at least one token to score")
        # The first token is predicted by the prompt (the root); token j + 1 by hidden state j.
        firsts = torch.tensor([c[0] for c in chunk], device=device)
        totals = root.double()[firsts] * torch.tensor([s == 0 for s in skips], device=device)
        width = max(len(c) for c in chunk) - 1
        if width > 0:
            ids = torch.tensor(
                [c[:-1] + [c[0]] * (width - len(c) + 1) for c in chunk], device=device
            )
            positions = (state.length + torch.arange(width, device=device)).expand(len(chunk), -1)
            cache = state.fresh_cache()
            cache.batch_repeat_interleave(len(chunk))
            hidden = run_decoder(
                model, cache, input_ids=ids, position_ids=positions
            ).last_hidden_state
            # Every scored position of the chunk in one gather, summed per row on the device.
            rows: list[int] = []
            steps: list[int] = []
            targets: list[int] = []
            for row, (c, s) in enumerate(zip(chunk, skips, strict=True)):
                rows += [row] * (len(c) - max(s, 1))
                steps += range(max(s, 1) - 1, len(c) - 1)
                targets += c[max(s, 1) :]
            if rows:
                index = torch.tensor(rows, device=device)
                picked = _target_logprobs(
                    model,
                    hidden[index, torch.tensor(steps, device=device)],
                    torch.tensor(targets, dtype=torch.long, device=device),
                )
                totals = totals.index_add(0, index, picked.double())
        out.extend(totals.tolist())
    return out


def _shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `sequences`."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        token = sequences[0][i]
        if any(s[i] != token for s in sequences):
            return i
    return shortest


def request_logprobs(
    model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32
) -> list[float]:
    """log p(continuation | context) of each (context, continuation) request.

    The contexts' longest common prefix is prefilled once; what follows it in each request
    (the rest of its context, then its continuation) runs in right-padded batches over that
    prefill, and only the continuation's tokens are scored."""
    if not requests:
        return []
    if any(not context or not continuation for context, continuation in requests):
        raise ValueError("every request needs a non-empty context and continuation")
    contexts = [list(context) for context, _ in requests]
    shared = _shared_prefix(contexts)
    if shared == 0:  # no token in common: score each first-token group on its own prefill
        out: list[float] = [0.0] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, context in enumerate(contexts):
            groups.setdefault(context[0], []).append(i)
        for members in groups.values():
            scores = request_logprobs(model, [requests[i] for i in members], batch_size=batch_size)
            for i, score in zip(members, scores, strict=True):
                out[i] = score
        return out
    state = prefill(model, contexts[0][:shared])
    tails = [
        context[shared:] + list(continuation)
        for context, (_, continuation) in zip(contexts, requests, strict=True)
    ]
    skips = [len(context) - shared for context in contexts]
    return continuation_logprobs(model, state, tails, scored_from=skips, batch_size=batch_size)


def scored_windows(
    n_tokens: int, window: int = 2048, stride: int = 1024
) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first_scored)`` over a sequence of `n_tokens` tokens such that every
    token but the first is scored exactly once, each with at least ``window - stride`` tokens of
    context when the sequence is long enough: a window covers tokens ``[start, end)`` and scores
    the predictions of tokens ``first_scored .. end-1``. With ``stride == window`` the windows do
    not overlap and each window's first token, which has no context in it, is not scored."""
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    out: list[tuple[int, int, int]] = []
    scored_until = 1  # token 0 has no context and is never scored
    start = 0
    while start + 1 < n_tokens and scored_until < n_tokens:
        end = min(start + window, n_tokens)
        out.append((start, end, max(scored_until, start + 1)))
        scored_until = end
        start += stride
    return out


def _target_logprobs(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each hidden state (float32), the LM head run in chunks of positions."""
    parts = []
    for first in range(0, len(targets), HEAD_CHUNK):
        logits = lm_head_logits(model, hidden[first : first + HEAD_CHUNK]).float()
        picked = logits.gather(1, targets[first : first + HEAD_CHUNK, None])[:, 0]
        parts.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts)


@torch.inference_mode()
def document_nlls(
    model: Any,
    documents: Sequence[Sequence[int]],
    *,
    window: int = 2048,
    stride: int = 1024,
    batch_tokens: int = 8192,
) -> list[tuple[float, int]]:
    """Per document, the total negative log-likelihood (nats) of its tokens but the first and
    how many tokens that is, scored in `scored_windows`.

    Each document is scored on its own (no packing), but windows of all documents share forward
    passes: windows sorted by length fill right-padded batches of at most `batch_tokens` tokens
    (at least one window each)."""
    device = model_device(model)
    spans = [
        (doc, start, end, first)
        for doc, ids in enumerate(documents)
        for start, end, first in scored_windows(len(ids), window, stride)
    ]
    spans.sort(key=lambda span: span[2] - span[1], reverse=True)  # similar lengths: little padding
    totals = [0.0] * len(documents)
    counts = [0] * len(documents)
    decoder = model.get_decoder()
    taken = 0
    while taken < len(spans):
        width = spans[taken][2] - spans[taken][1]
        group = spans[taken : taken + max(1, batch_tokens // width)]
        taken += len(group)
        batch = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (doc, start, end, _) in enumerate(group):
            batch[row, : end - start] = torch.as_tensor(documents[doc][start:end], dtype=torch.long)
            mask[row, : end - start] = 1
        output = decoder(
            input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False
        )
        hidden = output.last_hidden_state
        # Position p predicts token p + 1: the scored tokens' predictions sit one step earlier.
        offsets = [
            (row, first - start, end - start) for row, (_, start, end, first) in enumerate(group)
        ]
        rows = torch.cat([hidden[row, first - 1 : end - 1] for row, first, end in offsets])
        targets = torch.cat([batch[row, first:end] for row, first, end in offsets])
        logprobs = _target_logprobs(model, rows, targets.to(device)).double()
        sums = torch.stack(
            [part.sum() for part in logprobs.split([end - first for _, _, end, first in group])]
        ).tolist()  # one transfer per batch
        for (doc, _, end, first), part in zip(group, sums, strict=True):
            totals[doc] -= part
            counts[doc] += end - first
    return list(zip(totals, counts, strict=True))


def rolling_nll(
    model: Any,
    ids: Sequence[int],
    *,
    window: int = 2048,
    stride: int = 1024,
    batch_tokens: int = 8192,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `ids` and the number of tokens it covers (all
    but the first), scored in `scored_windows`; several windows share one forward pass."""
    return document_nlls(model, [ids], window=window, stride=stride, batch_tokens=batch_tokens)[0]
