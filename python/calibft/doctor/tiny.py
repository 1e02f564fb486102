"""Tiny random-weight models of the supported architecture families and a tiny tokenizer, built
locally from configs (no download): what `calibft doctor` checks, and what the tests build on.

- `tiny_tokenizer(path=None)`: byte-level BPE trained on the task's own words, digits as single
  tokens, a ChatML chat template ending turns with <|im_end|> (also the eos token).
- `family_model(tokenizer, family, window=WINDOW, seed=0)`: a 4-layer model of one of FAMILIES,
  float32, eval mode, loaded with the attention implementation calibft's loader picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from calibft.lm.attention import attention_implementation

FAMILIES = ("llama", "qwen3", "gemma3", "gemma3_it", "gemma2", "gpt_oss")
"""Llama, Qwen3, Gemma 3 text-only, the multimodal class Gemma-3-it 4B+ loads as, Gemma 2
(soft-capped logits) and GPT-OSS (mixture of experts, attention sinks)."""
SLIDING = ("gemma3", "gemma3_it", "gemma2", "gpt_oss")
WINDOW = 16
SOFTCAP = 3.0  # Gemma 2 ships 30; the tiny models' logits reach ~5, so 3 bends them visibly

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Words of the task prompts and of the chat turns, so BPE learns realistic multi-character tokens.
_CORPUS = [
    "Generate exactly ONE random number from a Gaussian distribution with parameters mu=0.4, "
    "sigma=1.5. Output ONLY the number.",
    "Uniform Beta Binomial Exponential Geometric Negative Binomial LogNormal Triangular Rayleigh "
    "Cauchy",
    "Student-t Chi-Square F Gamma Laplace Logistic Pareto Hypergeometric Gumbel Skellam "
    "Beta-Binomial",
    "Lomax Inverse Gaussian Bernoulli Poisson Weibull Maxwell Chi TruncNorm lambda alpha beta df n "
    "p r",
    "system user assistant You are a helpful assistant. Name a random city. The answer is -12.5e-3",
]


def tiny_tokenizer(path: Path | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with a ChatML template; saved under ``path`` if given."""
    tok = Tokenizer(models.BPE())
    # Digits split individually before BPE (like SmolLM2 and Qwen): numbers go digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    if path is not None:
        hf.save_pretrained(path)
    return hf


def family_config(tokenizer: Any, family: str, *, window: int = WINDOW) -> Any:
    """The config of a 4-layer model of ``family``; sliding layers alternate with full ones as in
    Gemma 2/3 and GPT-OSS."""
    common: dict[str, Any] = dict(
        vocab_size=(len(tokenizer) + 15) // 16 * 16 + 16,  # padded past the tokenizer, as usual
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Weights at 10x the usual scale (0.02): peaked next-token laws and attention, so that
        # a wrong mask or a dropped cap moves the numbers well past the tolerances.
        initializer_range=0.2,
    )
    sliding: dict[str, Any] = dict(
        sliding_window=window, layer_types=["sliding_attention", "full_attention"] * 2
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen3":
        return Qwen3Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**sliding, **common)
    if family == "gemma3_it":  # what AutoModelForCausalLM loads for Gemma-3-it 4B and up
        vision = SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        unused = range(common["vocab_size"] - 3, common["vocab_size"])  # past the tokenizer
        names = ("image_token_index", "boi_token_index", "eoi_token_index")
        special: dict[str, Any] = dict(zip(names, unused))
        return Gemma3Config(
            text_config=Gemma3TextConfig(**sliding, **common),
            vision_config=vision,
            mm_tokens_per_image=4,
            **special,
        )
    if family == "gemma2":
        return Gemma2Config(final_logit_softcapping=SOFTCAP, **sliding, **common)
    if family == "gpt_oss":
        return GptOssConfig(num_local_experts=4, num_experts_per_tok=2, **sliding, **common)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gemma3_it": Gemma3ForConditionalGeneration,
    "gemma2": Gemma2ForCausalLM,
    "gpt_oss": GptOssForCausalLM,
}


def family_model(
    tokenizer: Any, family: str, *, window: int = WINDOW, seed: int = 0
) -> PreTrainedModel:
    """A 4-layer random-init model of ``family`` (`family_config`), float32, eval mode."""
    config = family_config(tokenizer, family, window=window)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[family](config)
        if family == "gpt_oss":
            with torch.no_grad():  # sinks of unit scale weigh visibly against the keys
                for layer in model.model.layers:
                    layer.self_attn.sinks.normal_(0.0, 1.0)
    model.set_attn_implementation(attention_implementation(config))
    return model.eval()
