"""The model side of every pass: prompt prefill with its KV cache, the decoder on top of a cache,
and the model's logits from final hidden states."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.2x renamed the decoder's `past_key_values` (argument and output field) to `cache`;
# the old name now warns on every call and is to go in 5.40, while older releases know only it.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


@dataclass(frozen=True)
class PromptState:
    """A prefilled prompt: its KV cache and the final hidden state at its last token.

    The last token's hidden state gives the next-token distribution after the prompt.
    """

    ids: tuple[int, ...]  # the prompt's token ids
    cache: Any  # transformers Cache holding the KV of all `length` prompt tokens (batch 1)
    last_hidden: torch.Tensor  # [hidden]

    def fresh_cache(self) -> Any:
        """A private copy of the prompt cache (forward passes append to the cache they get)."""
        return copy.deepcopy(self.cache)

    @property
    def length(self) -> int:
        return len(self.ids)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_decoder(model: Any, cache: Any, **inputs: Any) -> Any:
    """The model's decoder (no LM head) on `inputs`, attending to and extending the KV `cache`
    (None: start a new one); returns its output, whose `last_hidden_state` the LM head reads."""
    return model.get_decoder()(**inputs, use_cache=True, **{CACHE_FIELD: cache})


@torch.inference_mode()
def prefill(model: Any, prompt_ids: list[int]) -> PromptState:
    """Run the prompt once through the decoder (no LM head) and keep its KV cache."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model_device(model))
    out = run_decoder(model, None, input_ids=ids)
    return PromptState(
        ids=tuple(prompt_ids),
        cache=getattr(out, CACHE_FIELD),
        last_hidden=out.last_hidden_state[0, -1],
    )


@dataclass(frozen=True)
class LogitHead:
    """The model's map from final hidden states to logits, as its own forward applies it:
    ``softcap * tanh((h W^T + b) / softcap)``, or plain ``h W^T + b`` when ``softcap`` is None.

    The fused KL kernels (`calibft.losses`) take these three pieces instead of materialized
    logits, so every pass that reads logits gets them from here and none can drop the cap.
    """

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None  # Gemma 2's final_logit_softcapping (30.0); None for most models


def logit_head(model: Any) -> LogitHead:
    """The LM head of `model` (a causal LM, or a PEFT model wrapping one) with its soft-capping.

    Raises ValueError for heads whose logits this cannot reproduce: a logit scale (Cohere,
    Granite), or a LoRA adapter on the LM head itself (its weight is no longer `head.weight`).
    """
    config = model.config.get_text_config()
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(
                f"model {config.model_type!r} rescales its logits ({name}), "
                "which calibft does not model"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"the LM head is a {type(head).__name__}, not a plain linear layer (a LoRA adapter on "
            "lm_head?); adapt other modules"
        )
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitHead(head.weight, head.bias, float(cap) if cap else None)


def lm_head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of final hidden states, as the model's own forward computes them."""
    head = logit_head(model)
    # Under a device_map the head may sit on another GPU than the last layer: follow the head.
    logits = torch.nn.functional.linear(hidden.to(head.weight.device), head.weight, head.bias)
    if head.softcap is not None:  # Gemma 2 squashes logits; without this they are not the model's
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits
