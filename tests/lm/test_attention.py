"""The attention guard: models load with an implementation that honours the exact pass's tree masks
and the architecture's attention features, and the exact pass refuses any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_model_dir
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
)

import calibft
from calibft.lm.attention import attention_implementation, check_tree_attention
from calibft.lm.decode import prefill
from calibft.lm.layout import TrieLayout
from calibft.lm.load import load_model_and_tokenizer
from calibft.lm.tree import edge_logprobs
from calibft.targets.numeric import build_output_space
from calibft.targets.trie import TrieTokenizer, build_trie

SMALL = dict(
    vocab_size=336,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


@pytest.fixture(scope="module")
def trie(tokenizer, chat):
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=1, max_bins=12)
    return build_trie(space, TrieTokenizer.from_hf(tokenizer, chat))


def gemma2(tokenizer) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **SMALL
    )
    return Gemma2ForCausalLM(config).eval()


def test_implementation_follows_the_architecture() -> None:
    assert attention_implementation(LlamaConfig(**SMALL)) == "sdpa"
    assert attention_implementation(Gemma3TextConfig(**SMALL)) == "sdpa"  # no attention cap
    assert Gemma2Config(**SMALL).attn_logit_softcapping is not None
    assert attention_implementation(Gemma2Config(**SMALL)) == "eager"
    # The cap decides, not the name: Gemma 2 without it is an ordinary sdpa model.
    assert attention_implementation(Gemma2Config(attn_logit_softcapping=None, **SMALL)) == "sdpa"
    assert attention_implementation(GptOssConfig(num_local_experts=2, **SMALL)) == "eager"


def test_loader_sets_the_implementation(tmp_path, tokenizer) -> None:
    model, _ = load_model_and_tokenizer(str(tiny_model_dir(tmp_path)))
    assert model.config._attn_implementation == "sdpa"
    path = tmp_path / "gemma2"
    gemma2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, _ = load_model_and_tokenizer(str(path))
    assert model.config._attn_implementation == "eager"
    check_tree_attention(model)


def test_flash_attention_is_refused(tokenizer, chat, trie) -> None:
    """A model set to FlashAttention 2 (no kernel needed: the guard reads the config) is refused
    by the public functions and by the tree pass itself, each with the way to load it instead."""
    model = tiny_model(tokenizer)
    ids = chat.prompt_ids("Name a random city.")
    state = prefill(model, ids)  # while the model still runs sdpa
    check_tree_attention(model)
    model.config._attn_implementation = "flash_attention_2"
    hint = "load the model with attn_implementation='sdpa'"
    with pytest.raises(ValueError, match=hint):
        calibft.exact_logprobs(model, ids, trie)
    with pytest.raises(ValueError, match=hint):
        calibft.logit_kl(model, ids, trie)
    with pytest.raises(ValueError, match=hint):
        edge_logprobs(model, state, TrieLayout.from_trie(trie))
    model.config._attn_implementation = "eager"  # eager applies 4-D masks too
    assert np.isfinite(calibft.exact_logprobs(model, ids, trie)).all()


def test_sdpa_is_refused_where_it_drops_a_feature(tokenizer, chat, trie) -> None:
    ids = chat.prompt_ids("Name a random city.")
    model = gemma2(tokenizer)
    assert model.config._attn_implementation == "eager"
    assert np.isfinite(calibft.exact_logprobs(model, ids, trie)).all()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=r"soft-capped attention.*attn_implementation='eager'"):
        calibft.exact_logprobs(model, ids, trie)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D tree masks.*attn_implementation='eager'"):
        calibft.logit_kl(model, ids, trie)


def test_sdpa_silently_drops_sinks(tokenizer) -> None:
    """Why GPT-OSS must run eager: under sdpa its forward runs, but without the sinks."""
    torch.manual_seed(0)
    model = GptOssForCausalLM(
        GptOssConfig(num_local_experts=2, num_experts_per_tok=2, **SMALL)
    ).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
        ids = torch.tensor([list(range(3, 40))])
        eager = model(ids).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(ids).logits
    assert (eager - sdpa).abs().max() > 1e-3
    with pytest.raises(ValueError, match="attention sinks.*attn_implementation='eager'"):
        check_tree_attention(model)
