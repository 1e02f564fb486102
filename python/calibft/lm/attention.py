"""Which attention implementation a model runs, and the check the exact pass makes before using it.

The exact pass (tree attention, `calibft.lm.tree`) gives the decoder a 4-D mask per chunk, in
which each trie node sees the prompt and its own ancestors only. eager and sdpa apply such a mask
as given; FlashAttention reads the mask as 2-D padding, so it crashes or returns wrong log-probs,
and flex_attention is untested here. sdpa in turn drops two features some architectures need:
soft-capped attention scores (Gemma 2) and attention sinks (GPT-OSS); those run eager.
"""

from __future__ import annotations

from typing import Any

# Architectures with attention sinks (learned per-head logits that take a share of the softmax).
SINK_MODEL_TYPES = frozenset({"gpt_oss"})

TREE_MASK_IMPLEMENTATIONS = ("eager", "sdpa")
"""Implementations that apply a 4-D attention mask as given."""


def _eager_reason(config: Any) -> str | None:
    """Why the architecture of `config` must run eager attention, or None."""
    text = config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "soft-capped attention scores (attn_logit_softcapping)"
    if text.model_type in SINK_MODEL_TYPES:
        return "attention sinks"
    return None


def attention_implementation(config: Any) -> str:
    """The `attn_implementation` to load the model of `config` with: eager when its attention has
    soft-capping or sinks, which sdpa drops; sdpa otherwise."""
    return "sdpa" if _eager_reason(config) is None else "eager"


def check_tree_attention(model: Any) -> None:
    """Raise a one-line ValueError unless `model` (a causal LM, or a PEFT model wrapping one) runs
    an attention implementation that honours 4-D tree masks and its architecture's features."""
    config = model.config
    used = config.get_text_config()._attn_implementation
    wanted = attention_implementation(config)
    reason = _eager_reason(config)
    if used in TREE_MASK_IMPLEMENTATIONS and (reason is None or used == "eager"):
        return
    why = (
        f"{used!r} attention drops this model's {reason}"
        if used == "sdpa"
        else f"{used!r} attention does not apply the exact pass's 4-D tree masks"
    )
    raise ValueError(
        f"{why}: load the model with attn_implementation={wanted!r} (calibft's loader does) "
        f"or call model.set_attn_implementation({wanted!r})"
    )
