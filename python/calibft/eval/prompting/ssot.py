"""String Seed of Thought (SSOT): the prompting baseline calibration fine-tuning is compared with
(docs/benchmarks/ssot.md).

SSOT is not a benchmark of its own but a mode of two: `structured` (mode "pif", probabilistic
instruction following) and `open_random` (mode "dag", diverse answer generation), switched on by
their `ssot` option. An instruction message goes before the unchanged task prompt and asks the
model to write a random string, reason from it, and give its answer in `<answer>` tags; the
answer is then extracted (`extract_ssot_answer`) and scored like a direct answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from calibft.chat import ChatFormat
from calibft.config import option
from calibft.eval.text import remove_think_blocks

PIF = "pif"
DAG = "dag"
MODES = (PIF, DAG)

_TAG_FORMAT = """Strictly follow this tag structure, and respond in the following format:
<random_string>
...
</random_string>
<thinking>
...
</thinking>
<answer>
...
</answer>"""

_SEED_LOOKS = (
    "This random string should appear sufficiently complex and unpredictable, with no obvious "
    "structure or pattern. Use your judgment to ensure it looks arbitrary and unguessable."
)

# The instruction texts are part of the protocol: verbatim, including the PIF text's "these two
# steps" before three steps (docs/benchmarks/ssot.md §2 gives their SHA-256).
_PIF = (
    "You are a helpful AI Assistant designed to provide well-reasoned and detailed responses. If "
    "the task involves probabilistic or non-deterministic reasoning, you must begin by generating "
    "a unique and complex random string to serve as a seed.\n"
    "\n"
    f"{_SEED_LOOKS}\n"
    "\n"
    "If the user explicitly instructs you to sample from a probability distribution, use the "
    "generated seed (the exact contents inside the `<random_string>` tags) to guide any random "
    "sampling or stochastic decisions.\n"
    "\n"
    "Follow these two steps for every instruction:\n"
    "1. Output the random seed string enclosed within `<random_string>` and `</random_string>` "
    "tags.\n"
    "2. Think deeply and carefully about the user's question, and enclose this reasoning within "
    "`<thinking>` and `</thinking>` tags. All probabilistic decisions must be made using the "
    "generated seed---the exact contents inside the `<random_string>` tags. Make sure to extract "
    "maximum randomness from the string by using all of its content.\n"
    "3. Provide your final answer, enclosed within `<answer>` and `</answer>` tags.\n"
    "\n"
    f"{_TAG_FORMAT}"
)

_DAG = (
    "You are a helpful AI Assistant designed to provide well-reasoned and detailed responses. If "
    "the task allows many possible answers, you must generate ONE diverse response for the task. "
    "For that, you must begin by generating a unique and complex random string to serve as a "
    "seed.\n"
    "\n"
    f"{_SEED_LOOKS}\n"
    "\n"
    "If the user asks you some question which allows multiple answers, use the generated seed "
    "(the exact contents inside the `<random_string>` tags) to guide any random sampling or "
    "stochastic decisions.\n"
    "\n"
    "Follow these steps for every instruction:\n"
    "1. Output the random seed string enclosed within `<random_string>` and `</random_string>` "
    "tags.\n"
    "2. Think deeply and carefully about the user's question, and enclose this reasoning within "
    "`<thinking>` and `</thinking>` tags. You have to generate ONE response leveraging the "
    "generated seed---the exact contents inside the `<random_string>` tags, to ensure your single "
    "answer is unique and diverse. Make sure to extract maximum randomness from the string by "
    "using all of its content.\n"
    "3. Provide your final answer, enclosed within `<answer>` and `</answer>` tags.\n"
    "\n"
    f"{_TAG_FORMAT}"
)

_HARMONY_CLOSING = (
    "Do not narrate conflicts between user and developer instructions. Do not emit role names, "
    "channel names, or tool-style syntax as plain text. The final channel must contain only the "
    "answer."
)

_HARMONY_OPENING = (
    "You must implement String Seed of Thought inside the model's native response protocol."
)

# GPT-OSS keeps the seed and its reasoning in its own analysis channel and answers bare in final.
_PIF_HARMONY = f"""{_HARMONY_OPENING}

For probabilistic or non-deterministic tasks:

1. In your analysis reasoning, first generate a unique and complex random string seed.
2. Use that seed for all stochastic or sampling decisions.
3. Keep the random string and all seeded reasoning in analysis only.
4. In final, output ONLY the final sampled answer, with no XML tags and no extra text.

{_HARMONY_CLOSING}"""

_DAG_HARMONY = f"""{_HARMONY_OPENING}

For tasks with many possible valid answers:

1. In your analysis reasoning, first generate a unique and complex random string seed.
2. Use that seed to make the answer diverse and non-deterministic.
3. Keep the random string and all seeded reasoning in analysis only.
4. In final, output ONLY the final answer, with no XML tags and no extra text.

{_HARMONY_CLOSING}"""

INSTRUCTIONS: dict[tuple[str, bool], str] = {
    (PIF, False): _PIF,
    (DAG, False): _DAG,
    (PIF, True): _PIF_HARMONY,
    (DAG, True): _DAG_HARMONY,
}


def is_gpt_oss(chat: ChatFormat) -> bool:
    """Whether the model speaks GPT-OSS's harmony format (the test `ChatFormat` applies too)."""
    return "<|channel|>" in str(getattr(chat.tokenizer, "chat_template", None) or "")


def instruction(mode: str, *, gpt_oss: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"SSOT mode must be one of {', '.join(MODES)}; got {mode!r}")
    return INSTRUCTIONS[(mode, gpt_oss)]


def messages(prompt: str, mode: str, *, gpt_oss: bool) -> list[dict[str, str]]:
    """The instruction (a developer message for GPT-OSS, a system message otherwise), then the
    task prompt unchanged as the user message."""
    return [
        {
            "role": "developer" if gpt_oss else "system",
            "content": instruction(mode, gpt_oss=gpt_oss),
        },
        {"role": "user", "content": prompt},
    ]


def render(chat: ChatFormat, prompt: str, mode: str) -> str:
    """The text the model answers under SSOT. Unlike a direct prompt, thinking stays on where the
    template has a switch (Qwen3 reasons natively first), and GPT-OSS gets no final-channel prefix
    (it writes its seed and reasoning in its analysis channel first)."""
    gpt_oss = is_gpt_oss(chat)
    if not chat.has_template:
        return chat.render(prompt, system=instruction(mode, gpt_oss=False))
    kwargs = {**chat.template_kwargs, "enable_thinking": True}
    try:
        text = chat.tokenizer.apply_chat_template(
            messages(prompt, mode, gpt_oss=gpt_oss),
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
    except Exception as err:  # jinja2's TemplateError, raised by templates that refuse the role
        role = "developer" if gpt_oss else "system"
        raise ValueError(
            f"the model's chat template refuses a {role} message ({err}); SSOT needs one for its "
            "instruction"
        ) from err
    return str(text)


def prompt_ids(chat: ChatFormat, prompt: str, mode: str) -> list[int]:
    # The template already carries BOS (as in ChatFormat.prompt_ids): no special tokens added.
    return list(chat.tokenizer(render(chat, prompt, mode), add_special_tokens=False)["input_ids"])


_ANSWER_PAIR = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_UNCLOSED = re.compile(r"<answer>\s*(.*)\Z", re.IGNORECASE | re.DOTALL)
# GPT-OSS output decoded with special tokens skipped runs its channel headers into the text
# (`analysis…assistantfinal<answer>…`): a header before a tag is dropped, and `assistantanswer>`
# is an `<answer>` whose `<` went with the header.
_HARMONY_HEADER_BEFORE_TAG = re.compile(r"assistant(?:final|commentary)\s*(?=<)", re.IGNORECASE)
_HARMONY_ANSWER_OPEN = re.compile(r"assistantanswer>", re.IGNORECASE)
_HARMONY_INLINE_ANSWERS = (
    re.compile(r"assistantanswer\s*([^\n<]+)", re.IGNORECASE),
    re.compile(r"assistantfinal\s*([^\n<]+)", re.IGNORECASE),
)
_SEED_AND_REASONING = re.compile(
    r"<random_string>.*?</random_string>|<thinking>.*?</thinking>", re.IGNORECASE | re.DOTALL
)
_ANY_TAG = re.compile(r"</?[a-z_]+>", re.IGNORECASE)


def extract_ssot_answer(
    text: str, *, strict: bool = True, gpt_oss: bool = False
) -> tuple[str, bool]:
    """The answer of a String Seed of Thought generation and whether its extraction is degraded
    (docs/benchmarks/ssot.md §4).

    Only the first closed `<answer>…</answer>` pair gives a non-degraded answer. Strict mode (the
    default) otherwise gives "" (an invalid sample), except for GPT-OSS (`gpt_oss=True`), whose
    inline final-channel answers are still read (degraded). Non-strict mode falls back to an
    unclosed `<answer>`, then to the last line left once the seed, reasoning and tags are gone."""
    text = remove_think_blocks(text)
    if gpt_oss:
        text = _HARMONY_ANSWER_OPEN.sub("<answer>", _HARMONY_HEADER_BEFORE_TAG.sub("", text))
    found = _ANSWER_PAIR.search(text)
    if found:
        return found.group(1).strip(), False
    found = None if strict else _ANSWER_UNCLOSED.search(text)
    if found:
        return found.group(1).strip(), True
    if gpt_oss:
        for pattern in _HARMONY_INLINE_ANSWERS:
            found = pattern.search(text)
            if found:
                return found.group(1).strip(), True
        bare = text.strip()
        if len(bare.splitlines()) == 1 and "<" not in bare and "assistant" not in bare.lower():
            return bare, True
    if strict:
        return "", True
    lines = [
        line.strip() for line in _ANY_TAG.sub("", _SEED_AND_REASONING.sub("", text)).splitlines()
    ]
    return next((line for line in reversed(lines) if line), text.strip()), True


def extract_answers(
    texts: Sequence[str], *, strict: bool, chat: ChatFormat
) -> tuple[list[str], list[bool]]:
    """Each generation's extracted answer and its degraded-extraction flag (generations decoded
    without special tokens; `chat` tells whether the model speaks harmony)."""
    gpt_oss = is_gpt_oss(chat)
    pairs = [extract_ssot_answer(text, strict=strict, gpt_oss=gpt_oss) for text in texts]
    return [answer for answer, _ in pairs], [degraded for _, degraded in pairs]


@dataclass
class SSOTOptions:
    """The SSOT switch of a benchmark that offers the mode: its ``Config`` inherits these fields
    (and calls `fill_mode_defaults` for the fields whose defaults the mode changes)."""

    ssot: bool = option(False, "String Seed of Thought prompting (docs/benchmarks/ssot.md)")
    ssot_strict: bool = option(
        True,
        "SSOT: only a closed <answer>...</answer> pair gives an answer (off: degraded fallbacks)",
    )


def fill_mode_defaults(
    config: SSOTOptions, plain: Mapping[str, Any], under_ssot: Mapping[str, Any]
) -> None:
    """Give each listed field the user left unset (None) its default for the config's mode.

    A benchmark whose defaults differ under SSOT (more tokens for the seed and the reasoning,
    fewer generations) declares those fields with a None default and calls this from its
    ``__post_init__``; a value the user set is kept."""
    for name, value in (under_ssot if config.ssot else plain).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
