"""Chat conventions (docs/method.md §1, §5): the rendered prompt, its token ids, and the end-of-turn
token that terminates every completion, for real tokenizers (SmolLM2, Qwen3, Llama 3) and tiny
ones with hand-written templates."""

from __future__ import annotations

import warnings
from functools import cache

import pytest
from tiny_models import CHATML_TEMPLATE, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from calibft.assets import llama3_tokenizer, qwen3_tokenizer
from calibft.chat import PINNED_DATE, ChatFormat
from calibft.distributions import prompt_text
from calibft.lm.load import load_tokenizer

PROMPT = prompt_text("gaussian", {"mu": 0.4, "sigma": 1.5})
VALUES = ["0", "7", "-1.50000", "123.45678", "3.14159", "1000", "-0.00010", "42"]


@cache
def real_tokenizer(name: str):
    if name == "smollm2":
        return load_tokenizer("smollm2-135m")
    if name == "qwen3":
        return qwen3_tokenizer()
    return llama3_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tiny_with_template(template: str | None, *, eos: str | None = "<|im_end|>", extra_tokens=()):
    """The tiny ChatML tokenizer's vocabulary with another template, eos and added tokens."""
    base = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token=eos, chat_template=template
    )
    if extra_tokens:
        tok.add_tokens(list(extra_tokens), special_tokens=True)
    return tok


# ---- real tokenizers ---------------------------------------------------------------------------

END_TOKENS = {"smollm2": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}
REAL_TOKENIZERS = [pytest.param(name, marks=pytest.mark.slow) for name in sorted(END_TOKENS)]


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_end_of_turn_token(name):
    tok = real_tokenizer(name)
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.has_template
    assert chat.end_token == END_TOKENS[name]
    assert chat.end_token_id == tok.convert_tokens_to_ids(END_TOKENS[name])


@pytest.mark.slow
def test_smollm2_end_token_comes_from_the_template_not_eos():
    """The SmolLM2 GGUF's metadata may name <|im_start|> as eos; the answer still ends at
    <|im_end|>."""
    tok = load_tokenizer("smollm2-135m")  # a fresh instance: the cached one stays untouched
    tok.eos_token = "<|im_start|>"
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.end_token == "<|im_end|>"
    assert chat.end_token_id != tok.eos_token_id


@pytest.mark.slow
def test_llama3_end_token_is_eot_not_eos():
    tok = real_tokenizer("llama3")
    chat = ChatFormat.from_tokenizer(tok)
    assert tok.eos_token == "<|end_of_text|>"
    assert chat.end_token == "<|eot_id|>" and chat.end_token_id != tok.eos_token_id


@pytest.mark.slow
def test_qwen3_prompt_has_thinking_switched_off():
    tok = real_tokenizer("qwen3")
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.template_kwargs["enable_thinking"] is False
    rendered = chat.render(PROMPT)
    # Qwen3's template writes an empty think block when thinking is disabled.
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered == tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert rendered.count(PROMPT) == 1


def test_template_kwargs_override_the_defaults():
    tok = real_tokenizer("qwen3")
    chat = ChatFormat.from_tokenizer(tok, template_kwargs={"enable_thinking": True})
    rendered = chat.render(PROMPT)
    assert rendered.endswith("<|im_start|>assistant\n") and "<think>" not in rendered
    assert chat.end_token == "<|im_end|>"


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_prompt_ids_are_the_rendered_prompt_without_added_specials(name):
    tok = real_tokenizer(name)
    chat = ChatFormat.from_tokenizer(tok)
    rendered = chat.render(PROMPT)
    assert PROMPT in rendered and rendered.index(PROMPT) > 0
    assert chat.prompt_ids(PROMPT) == ids(tok, rendered)
    assert chat.prompt_ids(PROMPT) != chat.prompt_ids(PROMPT + "!")


@pytest.mark.slow
def test_llama3_prompt_carries_exactly_one_bos():
    tok = real_tokenizer("llama3")
    chat = ChatFormat.from_tokenizer(tok)
    prompt_ids = chat.prompt_ids(PROMPT)
    assert prompt_ids[0] == tok.bos_token_id
    assert prompt_ids.count(tok.bos_token_id) == 1
    # The rendered prompt ends with the assistant header: the answer starts right after it.
    assert chat.render(PROMPT).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_completion_context_tokenizes_values_like_the_whole_prompt(name):
    """Tokenizing `context + value` gives the same completion ids as `rendered prompt + value`."""
    tok = real_tokenizer(name)
    chat = ChatFormat.from_tokenizer(tok)
    rendered = chat.render(PROMPT)
    context = chat.completion_context(PROMPT)
    assert rendered.endswith(context) and 0 < len(context) < len(rendered)
    # The context starts at the last added token of the rendered prompt.
    special = [t for t in tok.added_tokens_decoder.values()]
    assert any(context.startswith(str(t)) for t in special)
    assert not any(str(t) in context[1:] for t in special)
    full_prefix, ctx_prefix = ids(tok, rendered), ids(tok, context)
    for value in VALUES:
        full = ids(tok, rendered + value)
        short = ids(tok, context + value)
        assert full[: len(full_prefix)] == full_prefix and short[: len(ctx_prefix)] == ctx_prefix
        assert full[len(full_prefix) :] == short[len(ctx_prefix) :], value


# ---- tiny tokenizers with hand-written templates -----------------------------------------------


def test_chatml_tiny_tokenizer():
    tok = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.end_token == "<|im_end|>"
    assert chat.render("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt_ids("hi") == ids(
        tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.completion_context("hi") == "<|im_start|>assistant\n"


def test_end_token_is_the_first_added_token_after_the_answer():
    # <|endoftext|> is an added token too, but <|im_end|> comes first after the content.
    template = CHATML_TEMPLATE.replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '<|endoftext|>'")
    assert template != CHATML_TEMPLATE
    chat = ChatFormat.from_tokenizer(tiny_with_template(template, eos="<|endoftext|>"))
    assert chat.end_token == "<|im_end|>"


def test_longest_added_token_wins_a_tie():
    template = (
        "{% for m in messages %}"
        "<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}"
    )
    tok = tiny_with_template(template, extra_tokens=["<|start|>", "<|message|>", "<|end|>", "<|e"])
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.end_token == "<|end|>"


def test_harmony_template_gets_low_effort_and_the_final_channel():
    """GPT-OSS (harmony): reasoning_effort="low", generation prefix <|channel|>final<|message|>."""
    template = (
        "<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>"
        "{% for m in messages %}<|start|>{{ m['role'] }}"
        "{% if m['role'] == 'assistant' %}<|channel|>final<|message|>{{ m['content'] }}<|return|>"
        "{% else %}<|message|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
    )
    tok = tiny_with_template(
        template, extra_tokens=["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"]
    )
    chat = ChatFormat.from_tokenizer(tok)
    assert chat.template_kwargs["reasoning_effort"] == "low"
    rendered = chat.render("hi")
    assert "Reasoning: low" in rendered
    assert rendered.endswith("<|start|>assistant<|channel|>final<|message|>")
    assert chat.end_token == "<|return|>"
    assert chat.prompt_ids("hi") == ids(tok, rendered)
    assert chat.completion_context("hi") == "<|message|>"


def test_date_is_pinned():
    """Llama 3-style templates print today's date unless given one: calibft pins it
    (docs/method.md §1)."""
    template = (
        "{% if date_string is not defined %}"
        "{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + CHATML_TEMPLATE
    )
    chat = ChatFormat.from_tokenizer(tiny_with_template(template))
    assert chat.template_kwargs["date_string"] == PINNED_DATE
    assert f"Today Date: {PINNED_DATE}<|im_end|>" in chat.render("hi")


def test_no_chat_template_gives_the_bare_prompt_with_a_warning():
    tok = tiny_with_template(None, eos="<|endoftext|>")
    with pytest.warns(UserWarning, match="no chat template"):
        chat = ChatFormat.from_tokenizer(tok)
    assert not chat.has_template
    assert chat.render(PROMPT) == PROMPT
    assert chat.prompt_ids(PROMPT) == ids(tok, PROMPT)
    # Without a template the answer ends at the tokenizer's eos.
    assert chat.end_token == "<|endoftext|>"


def test_no_end_token_at_all_is_an_error():
    # A template that writes no added token after the answer, and no eos to fall back on.
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="eos_token"):
        ChatFormat.from_tokenizer(tiny_with_template(plain, eos=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="eos_token"):
            ChatFormat.from_tokenizer(tiny_with_template(None, eos=None))


def test_template_without_added_end_token_falls_back_to_eos():
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat = ChatFormat.from_tokenizer(tiny_with_template(plain, eos="<|endoftext|>"))
    assert chat.end_token == "<|endoftext|>"
    assert chat.render("hi") == "user: hi\nassistant: "
