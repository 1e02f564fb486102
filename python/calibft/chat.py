"""How a prompt reaches the model: chat template, generation prefix and end-of-turn token
(docs/method.md §1, §5)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

# Llama 3 and GPT-OSS templates print today's date; pinning it keeps tokens identical every day.
PINNED_DATE = "26 Jul 2024"
# Text used to locate the end-of-turn token in a rendered assistant message.
_SENTINEL = "CALIBFT_SENTINEL_7f3a"
# GPT-OSS (harmony) answers in channels; the completion must start in the final one.
_HARMONY_FINAL = "<|channel|>final<|message|>"


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer's chat conventions, resolved once."""

    tokenizer: Any = field(repr=False)
    end_token_id: int
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    has_template: bool = True
    generation_suffix: str = ""

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, template_kwargs: dict[str, Any] | None = None
    ) -> ChatFormat:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            warnings.warn(
                "tokenizer has no chat template: prompts are given to the model bare", stacklevel=2
            )
            return cls(tokenizer, _eos_id(tokenizer), {}, has_template=False)
        is_harmony = "<|channel|>" in str(template)
        kwargs: dict[str, Any] = {"enable_thinking": False, "date_string": PINNED_DATE}
        if is_harmony:
            kwargs["reasoning_effort"] = "low"
        kwargs.update(template_kwargs or {})
        suffix = _HARMONY_FINAL if is_harmony else ""
        end_id = _end_of_turn_id(tokenizer, kwargs)
        return cls(tokenizer, end_id, kwargs, has_template=True, generation_suffix=suffix)

    def render(self, prompt: str, system: str | None = None) -> str:
        """The full text the model is conditioned on, ending where its answer starts; `system`
        (optional) goes first as a system message."""
        if not self.has_template:
            return prompt if system is None else f"{system}\n\n{prompt}"
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            **self.template_kwargs,
        )
        return str(text) + self.generation_suffix

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        # The template already carries BOS; adding special tokens would double it.
        return list(
            self.tokenizer(self.render(prompt, system), add_special_tokens=False)["input_ids"]
        )

    @property
    def end_token(self) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(self.end_token_id))

    def completion_context(self, prompt: str) -> str:
        """The rendered prompt's tail from its last added token on.

        Tokenizers split added tokens out before anything else, so a completion's ids depend only
        on this tail: tokenizing `tail + value` is exact and much cheaper than the whole prompt.
        """
        rendered = self.render(prompt)
        starts = [rendered.rfind(tok) for tok in _added_token_strings(self.tokenizer)]
        start = max((s for s in starts if s >= 0), default=0)
        return rendered[start:]


def _added_token_strings(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [str(t.content if hasattr(t, "content") else t) for t in decoder.values() if str(t)]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "tokenizer has neither a chat template end-of-turn token nor an eos token; "
            "set tokenizer.eos_token or give it a chat template"
        )
    return int(eos)


def _end_of_turn_id(tokenizer: Any, kwargs: dict[str, Any]) -> int:
    """The first added token the template writes after an assistant message's content."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False,
        **kwargs,
    )
    tail = str(text).split(_SENTINEL, 1)[-1] if _SENTINEL in str(text) else ""
    found = [(tail.find(tok), tok) for tok in _added_token_strings(tokenizer)]
    found = [(pos, tok) for pos, tok in found if pos >= 0]
    if not found:
        return _eos_id(tokenizer)
    # Earliest position wins; at a tie the longer token is the real one (e.g. `<|end|>` vs `<|e`).
    pos, tok = min(found, key=lambda f: (f[0], -len(f[1])))
    return int(tokenizer.convert_tokens_to_ids(tok))
