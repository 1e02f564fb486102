"""`HFSession`, the model backend every benchmark uses, against plain full forwards of the model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from calibft.chat import ChatFormat
from calibft.lm.session import HFSession, end_token_ids

PROMPT = "Name a random city."


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def session(request):
    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer)
    model = tiny_model(tokenizer, request.param)
    return HFSession(model, tokenizer, chat, end_token_ids(tokenizer, chat), sample_batch_size=7)


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_next_token_logprobs_equal_the_full_forward(session):
    ids = session.chat.prompt_ids(PROMPT)
    got = session.next_token_logprobs(session.prefill(ids))
    torch.testing.assert_close(got, full_logprobs(session.model, ids)[-1], atol=1e-5, rtol=1e-5)


def test_system_message_reaches_the_prompt(session):
    with_system = session.chat.render(PROMPT, system="You are a dice.")
    assert with_system.index("You are a dice.") < with_system.index(PROMPT)
    assert session.chat.prompt_ids(PROMPT, system="You are a dice.") != session.chat.prompt_ids(
        PROMPT
    )


def test_loglikelihood_of_continuations_equals_the_full_forward(session):
    context = session.chat.prompt_ids(PROMPT)
    continuations = [[40], [41, 42, 43], [44, 45], [46, 47, 48, 49, 50]]
    got = session.loglikelihood(context, continuations)
    for value, cont in zip(got, continuations, strict=True):
        logprobs = full_logprobs(session.model, context + cont)
        expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="at least one token to score"):
        session.loglikelihood(context, [[]])


def test_greedy_follows_the_argmax_of_full_forwards(session):
    ids = session.chat.prompt_ids(PROMPT)
    got = session.greedy(ids, max_new_tokens=6)
    expected, seq = [], list(ids)
    for _ in range(6):
        token = int(full_logprobs(session.model, seq)[-1].argmax())
        if token in session.end_ids:
            break
        expected.append(token)
        seq.append(token)
    assert got == expected


def test_sampling_is_seeded_and_shares_the_prefill(session):
    state = session.prefill(session.chat.prompt_ids(PROMPT))
    a = session.sample(state, 20, seed=3, max_new_tokens=5)
    assert a == session.sample(state, 20, seed=3, max_new_tokens=5)
    assert a != session.sample(state, 20, seed=4, max_new_tokens=5)
    assert len(a) == 20 and all(len(row) <= 5 and not set(row) & set(session.end_ids) for row in a)


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(9, 16, 8), (40, 16, 8), (41, 12, 5), (70, 8, 7)]
)
def test_rolling_nll_scores_every_token_but_the_first_once(session, length, window, stride):
    torch.manual_seed(length)
    ids = torch.randint(3, len(session.tokenizer), (length,)).tolist()
    total, count = session.rolling_nll(ids, window, stride)
    assert count == length - 1
    # Brute force: each token scored with exactly the context its window gives it.
    expected = 0.0
    start, scored_until = 0, 1
    while scored_until < length:
        end = min(start + window, length)
        logprobs = full_logprobs(session.model, ids[start:end])
        expected -= sum(float(logprobs[t - start - 1, ids[t]]) for t in range(scored_until, end))
        scored_until, start = end, start + stride
    assert total == pytest.approx(expected, rel=1e-5)


def test_decode_keeps_special_tokens(session):
    assert "<|im_end|>" in session.decode([session.chat.end_token_id])


def test_decode_drops_special_tokens_when_asked(session):
    ids = session.chat.prompt_ids(PROMPT)
    text = session.decode(ids, special=False)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text and PROMPT in text
    assert session.decode(ids, special=True) != text


def test_encode_adds_no_special_token_and_round_trips(session):
    rendered = session.chat.render(PROMPT)
    ids = session.encode(rendered)
    assert ids == session.chat.prompt_ids(PROMPT)  # the template carries its own special tokens
    assert session.decode(ids) == rendered
    assert session.encode("") == []


def test_bos_max_positions_and_device_come_from_the_model(session):
    assert session.bos_id is None  # the tiny tokenizer has no BOS
    limit = session.model.config.get_text_config().max_position_embeddings
    assert session.max_positions == limit and isinstance(session.max_positions, int)
    assert session.device == torch.device("cpu")
    session.tokenizer.bos_token = "<|endoftext|>"
    try:
        assert session.bos_id == session.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    finally:
        session.tokenizer.bos_token = None


def test_trie_logprobs_equal_teacher_forced_scores_of_the_scored_nodes(session):
    """Every edge leaving the chosen nodes is scored as a full forward of its prefix would; the
    other edges are NaN, and scoring every node at once gives the same numbers."""
    import numpy as np

    from calibft.lm.layout import TrieLayout
    from calibft.targets import TrieTokenizer, space_from_values
    from calibft.targets.trie import build_trie

    space = space_from_values(["Paris", "Lima", "Lyon", "Li"], [0.4, 0.3, 0.2, 0.1], PROMPT)
    trie = build_trie(space, TrieTokenizer.from_hf(session.tokenizer, session.chat))
    layout = TrieLayout.from_trie(trie)
    prompt_ids = session.chat.prompt_ids(PROMPT)
    state = session.prefill(prompt_ids)
    every = session.trie_logprobs(state, layout, chunk_size=2)
    nodes = layout.internal[1::2]
    some = session.trie_logprobs(state, layout, nodes)
    edges, _ = layout.edges_of(nodes)
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(some)), np.sort(edges))
    np.testing.assert_allclose(some[edges], every[edges], atol=1e-5)
    for edge in range(len(layout.tokens)):
        prefix = []
        node = int(layout.parent[layout.children[edge]])
        while node > 0:
            prefix.insert(0, int(layout.token_in[node]))
            node = int(layout.parent[node])
        expected = full_logprobs(session.model, prompt_ids + prefix)[-1, layout.tokens[edge]]
        assert every[edge] == pytest.approx(float(expected), abs=1e-5)
