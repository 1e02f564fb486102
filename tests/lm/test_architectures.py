"""Every pass on the paper's model families (docs/architectures.md): tiny random Llama, Qwen3,
Gemma 3 (text-only, and the multimodal class that Gemma-3-it 4B+ loads as), Gemma 2 (soft-capped
logits) and GPT-OSS (mixture of experts, attention sinks), with sliding windows shorter than the
prompt, checked against the model's own plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_tokenizer
from transformers import (
    PreTrainedTokenizerFast,
)

import calibft
from calibft.chat import ChatFormat
from calibft.doctor.checks import LONG_PROMPT, chi_square_p
from calibft.doctor.tiny import FAMILIES, SLIDING, SOFTCAP, WINDOW, family_model
from calibft.lm.adapters import add_lora, peft_wrapping
from calibft.lm.decode import logit_head, prefill
from calibft.lm.layout import TrieLayout
from calibft.lm.sample import sample_completions
from calibft.lm.tree import attention_spans, edge_logprobs
from calibft.losses import dense_sparse_kl
from calibft.targets.numeric import build_output_space
from calibft.targets.trie import TrieTokenizer, build_trie
from calibft.train.config import TrainConfig
from calibft.train.data import DataPlan, ExampleBuilder
from calibft.train.loop import CompletionLoss, check_model

# (family, window): every family at WINDOW; two also at a window shorter than the trie's depth,
# where a node no longer sees its own first ancestors.
CASES = [(f, WINDOW) for f in FAMILIES] + [("gemma3", 3), ("gpt_oss", 3)]


@pytest.fixture(scope="module")
def trie(tokenizer, chat):
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=1, max_bins=40)
    return build_trie(space, TrieTokenizer.from_hf(tokenizer, chat))


@pytest.fixture(scope="module")
def long_ids(chat):
    ids = chat.prompt_ids(LONG_PROMPT)
    assert len(ids) > 4 * WINDOW
    return ids


def prompt_of(long_ids, window: int, length: str) -> list[int]:
    """The long chat prompt, or its last window // 2 tokens (still ending at the answer)."""
    return long_ids if length == "long" else long_ids[-max(1, window // 2) :]


def completions(trie) -> list[list[int]]:
    offsets, ids = trie.value_paths()
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids, rows) -> torch.Tensor:
    """log softmax of the model's plain forward over prompt + each row (one batch, right-padded:
    causal attention never reads the padding), float64 [rows, len(prompt) + longest, V]."""
    width = len(prompt_ids) + max(len(r) for r in rows)
    batch = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(prompt_ids) + len(row)] = torch.tensor(prompt_ids + row)
    return torch.log_softmax(model(batch).logits.double(), dim=-1)


def random_lora(model, seed: int = 0):
    """A LoRA adapter with random non-zero weights on the attention projections."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    with peft_wrapping():
        return get_peft_model(model, config).eval()


# ---- the model families as built -------------------------------------------------------------


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_layers_cache_only_the_window(tokenizer, long_ids, family) -> None:
    """The premise of the masks: a sliding layer's cache keeps the prompt's last W - 1 keys."""
    model = family_model(tokenizer, family)
    spans = attention_spans(model, prefill(model, long_ids))
    assert spans["full_attention"].cached == len(long_ids)
    assert spans["full_attention"].window is None
    assert spans["sliding_attention"].cached == WINDOW - 1
    assert spans["sliding_attention"].window == WINDOW


def test_soft_cap_and_sinks_are_live(tokenizer, long_ids) -> None:
    """Gemma 2's cap changes its logits and GPT-OSS's sinks change its outputs, so a pass that
    dropped either would fail the comparisons below."""
    gemma2 = family_model(tokenizer, "gemma2")
    head = logit_head(gemma2)
    assert head.softcap == SOFTCAP
    with torch.no_grad():
        hidden = gemma2.model(torch.tensor([long_ids])).last_hidden_state[0]
        raw = hidden @ head.weight.T
        capped = gemma2(torch.tensor([long_ids])).logits[0]
    torch.testing.assert_close(capped, SOFTCAP * torch.tanh(raw / SOFTCAP))
    assert (capped - raw).abs().max() > 0.1
    oss = family_model(tokenizer, "gpt_oss")
    with torch.no_grad():
        before = oss(torch.tensor([long_ids])).logits
        for layer in oss.model.layers:
            layer.self_attn.sinks.fill_(-torch.inf)  # no sinks: all the mass goes to the keys
        after = oss(torch.tensor([long_ids])).logits
    assert (before - after).abs().max() > 1e-3


# ---- exact log-probabilities and the logit KL ------------------------------------------------


@pytest.mark.parametrize("length", ["short", "long"])
@pytest.mark.parametrize(("family", "window"), CASES)
def test_exact_logprobs_equal_teacher_forcing(
    tokenizer, trie, long_ids, family, window, length
) -> None:
    model = family_model(tokenizer, family, window=window)
    prompt_ids = prompt_of(long_ids, window, length)
    assert len(prompt_ids) < window if length == "short" else len(prompt_ids) > 4 * window
    rows = completions(trie)
    assert max(len(r) for r in rows) > 3  # deeper than the small window
    logp = teacher_forced_logprobs(model, prompt_ids, rows)
    start = len(prompt_ids) - 1
    expected = np.array(
        [sum(float(logp[i, start + k, t]) for k, t in enumerate(row)) for i, row in enumerate(rows)]
    )
    got = calibft.exact_logprobs(model, prompt_ids, trie)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    if length == "long":
        # Chunks of 5 nodes: most start deep in the trie and carry ancestors as context.
        layout = TrieLayout.from_trie(trie)
        state = prefill(model, prompt_ids)
        chunked = layout.value_logprobs(edge_logprobs(model, state, layout, chunk_size=5))
        np.testing.assert_allclose(chunked, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_logprobs_with_a_lora_adapter(tokenizer, trie, long_ids, family) -> None:
    model = random_lora(family_model(tokenizer, family))
    rows = completions(trie)
    logp = teacher_forced_logprobs(model, long_ids, rows)
    start = len(long_ids) - 1
    expected = [
        sum(float(logp[i, start + k, t]) for k, t in enumerate(row)) for i, row in enumerate(rows)
    ]
    np.testing.assert_allclose(
        calibft.exact_logprobs(model, long_ids, trie), expected, rtol=0, atol=1e-5
    )


def dense_logit_kl(model, prompt_ids, trie, num_paths: int, seed: int) -> float:
    """The logit KL from full forwards: full-vocabulary log-softmax at every position of every
    sampled path, targets floored at 1e-8 and renormalized (docs/benchmarks/structured.md §4)."""
    _, offsets, ids = trie.sample_paths(num_paths, seed)
    paths = [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    logp = teacher_forced_logprobs(model, prompt_ids, [p.tolist() for p in paths])
    per_path = []
    for i, path in enumerate(paths):
        t_off, t_tok, t_q = trie.targets_along(path)
        kls = []
        for k in range(len(path)):
            q = np.maximum(t_q[t_off[k] : t_off[k + 1]], 1e-8)
            q = q / q.sum()
            lp = logp[i, len(prompt_ids) - 1 + k, t_tok[t_off[k] : t_off[k + 1]]].numpy()
            kls.append(float(np.sum(q * (np.log(q) - lp))))
        per_path.append(np.mean(kls))
    return float(np.mean(per_path))


@pytest.mark.parametrize("length", ["short", "long"])
@pytest.mark.parametrize(("family", "window"), CASES)
def test_logit_kl_equals_dense_forward(tokenizer, trie, long_ids, family, window, length) -> None:
    model = family_model(tokenizer, family, window=window)
    prompt_ids = prompt_of(long_ids, window, length)
    got = calibft.logit_kl(model, prompt_ids, trie, num_paths=4, seed=7)
    assert got == pytest.approx(dense_logit_kl(model, prompt_ids, trie, 4, 7), rel=1e-5, abs=1e-5)


def test_public_functions_leave_the_model_mode_and_check_ids(tokenizer, trie, long_ids) -> None:
    model = family_model(tokenizer, "gemma3").train()
    calibft.exact_logprobs(model, long_ids, trie)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="prompt_ids"):
        calibft.exact_logprobs(model, [10**6], trie)
    with pytest.raises(ValueError, match="num_paths"):
        calibft.logit_kl(model, long_ids, trie, num_paths=0)


# ---- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_tokens_follow_the_model(tokenizer, long_ids, family) -> None:
    """First tokens (from the prefill) and second tokens (one cached decoding step past the
    window) against the full forward's next-token law and its exact second-token marginal."""
    model = family_model(tokenizer, family)
    prompt_ids = long_ids[-(WINDOW + 8) :]  # past the window; cheap to run once per token
    n = 6000
    drawn = sample_completions(
        model, prefill(model, prompt_ids), n, seed=3, end_ids=[], max_new_tokens=2, batch_size=n
    )
    vocab = model.config.get_text_config().vocab_size
    first = np.bincount([d[0] for d in drawn], minlength=vocab)
    second = np.bincount([d[1] for d in drawn], minlength=vocab)
    with torch.no_grad():
        p_first = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1].double(), -1)
    # P(second = t) = Σ_u P(first = u) P(t | prompt, u): one forward per first token.
    logp = teacher_forced_logprobs(model, prompt_ids, [[u] for u in range(vocab)])
    p_second = p_first @ logp[:, len(prompt_ids)].exp()
    assert chi_square_p(first, p_first.numpy()) > 1e-3
    assert chi_square_p(second, p_second.numpy()) > 1e-3
    # The test has power: a law at temperature 1.5 is rejected.
    hotter = torch.softmax(torch.log(p_first) / 1.5, -1)
    assert chi_square_p(first, hotter.numpy()) < 1e-4


# ---- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_equals_dense_loss(tokenizer, chat, trie, long_ids, family) -> None:
    """One step's fused loss (and its LoRA gradients) equals the loss from the model's own full
    forward logits, on a padded batch longer than the window."""
    model = family_model(tokenizer, family)
    config = TrainConfig(method="soft", lora_dropout=0.0)
    check_model(model, config)
    lm = add_lora(model, r=4, alpha=8, dropout=0.0, targets=config.lora_targets, base_name=family)
    module = CompletionLoss(lm, temperature=0.8, chunk_size=5).train()
    prompts = [long_ids, chat.prompt_ids("Name a random city.")]
    plan = DataPlan(["gaussian", "gaussian"], 1, 0, 2, 1, 0, 1)
    builder = ExampleBuilder(config, prompts, [trie, trie], tokenizer.pad_token_id)
    batch = builder.batch(plan, 0, [0, 1])
    assert batch.input_ids.shape[1] > WINDOW and bool((batch.attention_mask == 0).any())
    trainable = [p for p in module.parameters() if p.requires_grad]

    fused = module(*batch.inputs(torch.device("cpu")))
    fused.backward()
    # Adapters on Gemma-3-it's vision tower take no part in text and get no gradient either way.
    fused_grads = [p.grad for p in trainable]
    module.zero_grad(set_to_none=True)
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    selected = logits.reshape(-1, logits.shape[-1])[batch.positions]
    dense = dense_sparse_kl(selected, batch.targets, batch.weights, temperature=0.8)
    dense.backward()
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)
    layers = model.config.get_text_config().num_hidden_layers
    assert sum(g is not None for g in fused_grads) == 8 * layers  # A and B of q, k, v, o
    for got, p in zip(fused_grads, trainable, strict=True):
        if got is None or p.grad is None:
            assert got is p.grad
        else:
            torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4)


# ---- LoRA targets and chat formats -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_fit_every_family(tokenizer, family) -> None:
    """q, k, v, o projections (the paper's targets) exist in every family, GPT-OSS included."""
    model = family_model(tokenizer, family)
    config = TrainConfig()
    check_model(model, config)  # soft-capped Gemma 2 included: nothing is refused
    lm = add_lora(model, r=2, alpha=4, dropout=0.0, targets=config.lora_targets, base_name=family)
    lora_a = [n.split(".lora_A")[0] for n, _ in lm.named_parameters() if "lora_A" in n]
    adapted = {n.rsplit(".", 1)[-1] for n in lora_a}
    assert adapted == set(config.lora_targets)
    # Every decoder layer's four projections (Gemma-3-it's vision tower has q, k, v_proj too).
    layers = model.config.get_text_config().num_hidden_layers
    assert len([n for n in lora_a if ".layers." in n and "vision" not in n]) == 4 * layers


def test_gpt_oss_experts_are_not_lora_targets(tokenizer) -> None:
    """GPT-OSS's experts and router hold bare parameters, which LoRA cannot adapt by module name:
    refused before training starts, naming the linear modules that can be adapted."""
    model = family_model(tokenizer, "gpt_oss")
    for target in ("experts", "router"):
        with pytest.raises(ValueError, match=rf"lora_targets: {target} not found.*q_proj"):
            check_model(model, TrainConfig(lora_targets=["q_proj", target]))


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_gemma_chat_format() -> None:
    """Gemma's turn format (no Gemma tokenizer ships offline; the template is its essentials): the
    completion ends with <end_of_turn>, the prompt carries one bos and ends at the model turn."""
    base = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        chat_template=GEMMA_TEMPLATE,
    )
    tok.add_tokens(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.end_token == "<end_of_turn>"
    rendered = chat.render("hi")
    assert rendered == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = chat.prompt_ids("hi")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
