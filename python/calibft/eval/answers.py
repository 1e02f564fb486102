"""Validity rules of a generated sample (docs/benchmarks/structured.md).

A generation is valid if, after removing any reasoning trace, the stripped text fully matches a
decimal or scientific-notation literal, is finite, lies within the family's support and, for
integer families, is integral. Parsing never raises on malformed text: such a generation is simply
invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from calibft.distributions import get_family, support

# re.ASCII: `\d` would otherwise also match e.g. Arabic-Indic digits, which float() accepts.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)

# A closed reasoning block, an unterminated one (generation stopped while still thinking: there
# is no answer after it), and a bare closing tag (some templates open the block in the prompt).
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*\Z", re.DOTALL)
_THINK_CLOSE = re.compile(r"\A.*</think>", re.DOTALL)

# GPT-OSS (harmony): the answer is whatever follows the last final-channel header; an analysis
# channel with no final channel after it holds no answer. The second spelling is the same text
# decoded with special tokens skipped.
_FINAL_HEADER = re.compile(r"\A.*(?:<\|channel\|>final<\|message\|>|assistantfinal)", re.DOTALL)
_ANALYSIS_ONLY = re.compile(r"(?:<\|channel\|>analysis|\Aanalysis).*\Z", re.DOTALL)
_HARMONY_TRAILER = re.compile(r"(?:<\|return\|>|<\|end\|>|<\|call\|>)\s*\Z")

INTEGER_TOLERANCE = 1e-9


def strip_reasoning(text: str) -> str:
    """The answer part of a completion: reasoning traces (closed or not) removed."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_OPEN.sub("", text)
    text = _THINK_CLOSE.sub("", text)
    final = _FINAL_HEADER.match(text)
    if final is not None:
        text = text[final.end() :]
    else:
        text = _ANALYSIS_ONLY.sub("", text)
    return _HARMONY_TRAILER.sub("", text)


def parse_number(text: str) -> float:
    """The number a completion states, or nan if it is not exactly one finite numeric literal."""
    answer = strip_reasoning(text).strip()
    if _NUMBER.fullmatch(answer) is None:
        return math.nan
    value = float(answer)  # cannot raise on a matched literal; huge exponents give inf
    return value if math.isfinite(value) else math.nan


@dataclass(frozen=True)
class ParsedSamples:
    """Parsed generations of one prompt: `values` (nan where invalid) and the `valid` mask."""

    values: np.ndarray  # float64[n]
    valid: np.ndarray  # bool[n]

    @property
    def valid_rate(self) -> float:
        """Fraction of valid generations (nan for zero generations)."""
        return float(self.valid.mean()) if self.valid.size else math.nan

    @property
    def valid_values(self) -> np.ndarray:
        return self.values[self.valid]


def parse_samples(
    texts: Iterable[str], family_id: str, params: Mapping[str, float]
) -> ParsedSamples:
    """Apply docs/benchmarks/structured.md's validity rules to every generation of one prompt."""
    lo, hi = support(family_id, params)
    values = np.array([parse_number(text) for text in texts], dtype=np.float64)
    with np.errstate(invalid="ignore"):  # nan compares False, so invalid stays invalid
        valid = (values >= lo) & (values <= hi)
        if get_family(family_id).integer_only:
            valid &= np.abs(values - np.round(values)) <= INTEGER_TOLERANCE
    values[~valid] = np.nan
    return ParsedSamples(values=values, valid=valid)


# Open-ended answers, MCQ generations and SSOT answer extraction (docs/benchmarks/open_random.md,
# docs/benchmarks/mcq.md, docs/benchmarks/ssot.md). These benchmarks clean reasoning blocks in any
# letter case: closed blocks first, then an unclosed one up to the end (generation stopped while
# thinking), then stray tags.
_ANY_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_ANY_THINK_UNCLOSED = re.compile(r"<think>.*\Z", re.IGNORECASE | re.DOTALL)
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)
_WHITESPACE_RUN = re.compile(r"\s+")


def remove_think_blocks(text: str) -> str:
    """`text` without its closed `<think>…</think>` blocks and without an unclosed one."""
    return _ANY_THINK_UNCLOSED.sub("", _ANY_THINK_BLOCK.sub("", text))


def strip_think(text: str) -> str:
    """Think blocks removed, then any stray think tag; stripped ("" when nothing is left)."""
    return _THINK_TAG.sub("", remove_think_blocks(text).strip()).strip()


def has_think_tag(text: str) -> bool:
    return _THINK_TAG.search(text) is not None


def _collapse(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", text.strip())


def normalize_open_answer(text: str) -> str:
    """An open-ended answer as it is counted: reasoning removed, the first non-empty line (lines as
    `str.splitlines` cuts them), whitespace runs collapsed, one pair of matching outer quotes
    dropped. Case and punctuation are kept (`Paris.` and `Paris` differ); "" when nothing is left."""
    line = next((part.strip() for part in strip_think(text).splitlines() if part.strip()), "")
    answer = _collapse(line)
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "'\"":
        answer = answer[1:-1].strip()
    return answer


MCQ_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCQParse:
    """A generated multiple-choice question read by the strict line-prefix parser.

    ``parseable``: no format error at all. ``answer``: the stated correct letter when it is exactly
    one of A-D (set whatever other errors there are), else None. ``errors``: the error names in the
    order found. ``options``: the texts of A-D ("" where missing)."""

    parseable: bool
    answer: str | None
    errors: tuple[str, ...]
    question: str = ""
    options: tuple[str, str, str, str] = ("", "", "", "")
    explanation: str = ""
    unique_options: bool = False
    correct_option_nonempty: bool = False


def parse_mcq(text: str) -> MCQParse:
    """Read one generation in the format the MCQ prompt asks for (docs/benchmarks/mcq.md §3).

    Never raises: empty, truncated, prose or garbage text yields a non-parseable result whose
    ``errors`` say why."""
    cleaned = strip_think(text)
    if not cleaned:
        return MCQParse(parseable=False, answer=None, errors=("empty_response",))
    errors: list[str] = []
    question: str | None = None
    stated: str | None = None
    explanation: str | None = None
    options: dict[str, str] = {}
    for line in (part.strip() for part in cleaned.splitlines()):
        if not line:
            continue
        if line.startswith("Question:"):
            if question is not None:
                errors.append("duplicate_question")
            else:
                question = _collapse(line.partition(":")[2])
        elif line[:2] in {f"{letter}." for letter in MCQ_LETTERS}:
            letter = line[0]
            if letter in options:
                errors.append(f"duplicate_option_{letter.lower()}")
            else:
                options[letter] = _collapse(line[2:])
        elif line.startswith("Correct Answer:"):
            if stated is not None:
                errors.append("duplicate_correct_answer")
            else:
                stated = _collapse(line.partition(":")[2])
        elif line.startswith("Explanation:"):
            if explanation is not None:
                errors.append("duplicate_explanation")
            else:
                explanation = _collapse(line.partition(":")[2])
        else:
            errors.append("unexpected_line")
    errors += [
        f"missing_option_{letter.lower()}" for letter in MCQ_LETTERS if letter not in options
    ]
    for name, value in (
        ("question", question),
        ("explanation", explanation),
        ("correct_answer", stated),
    ):
        if value is None:
            errors.append(f"missing_{name}")
    for name, value in (("question", question), ("explanation", explanation)):
        if value == "":
            errors.append(f"empty_{name}")
    errors += [
        f"empty_option_{letter.lower()}" for letter in MCQ_LETTERS if options.get(letter) == ""
    ]
    answer = stated if stated in MCQ_LETTERS else None
    if answer is None:
        errors.append("invalid_correct_answer")
    texts = tuple(options.get(letter, "") for letter in MCQ_LETTERS)
    return MCQParse(
        parseable=not errors,
        answer=answer,
        errors=tuple(errors),
        question=question or "",
        options=texts,  # type: ignore[arg-type]
        explanation=explanation or "",
        unique_options=all(texts) and len(set(texts)) == len(texts),
        correct_option_nonempty=answer is not None and bool(texts[MCQ_LETTERS.index(answer)]),
    )


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
