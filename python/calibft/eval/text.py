"""Reading a generation's answer, for every benchmark that reads text: one reasoning stripper
with one policy, and the normalization of open-ended answers.

The policy (`strip_reasoning`), in order: `<think>` tags in any letter case; closed
`<think>…</think>` blocks are removed; an unclosed one is removed up to the end (generation stopped
while still thinking: there is no answer after it); text up to a bare closing tag is removed (some
templates open the block in the prompt). Then GPT-OSS (harmony) channels: the answer is whatever
follows the last final-channel header; an analysis channel with no final channel after it holds no
answer; a trailing end-of-message token is dropped. The second spelling of each header is the same
text decoded with special tokens skipped. `remove_think_blocks` is the first half alone, for
readers that handle harmony themselves (String Seed of Thought).
"""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*\Z", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"\A.*</think>", re.IGNORECASE | re.DOTALL)
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)

_FINAL_HEADER = re.compile(r"\A.*(?:<\|channel\|>final<\|message\|>|assistantfinal)", re.DOTALL)
_ANALYSIS_ONLY = re.compile(r"(?:<\|channel\|>analysis|\Aanalysis).*\Z", re.DOTALL)
_HARMONY_TRAILER = re.compile(r"(?:<\|return\|>|<\|end\|>|<\|call\|>)\s*\Z")

_WHITESPACE_RUN = re.compile(r"\s+")


def remove_think_blocks(text: str) -> str:
    """`text` without its reasoning blocks: closed ones, an unclosed one, and whatever precedes a
    bare closing tag (the module docstring's policy, first half)."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_OPEN.sub("", text)
    return _THINK_CLOSE.sub("", text)


def strip_reasoning(text: str) -> str:
    """The answer part of a completion: reasoning blocks and harmony analysis removed."""
    text = remove_think_blocks(text)
    final = _FINAL_HEADER.match(text)
    if final is not None:
        text = text[final.end() :]
    else:
        text = _ANALYSIS_ONLY.sub("", text)
    return _HARMONY_TRAILER.sub("", text)


def has_think_tag(text: str) -> bool:
    return _THINK_TAG.search(text) is not None


def collapse_whitespace(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", text.strip())


def normalize_open_answer(text: str) -> str:
    """An open-ended answer as it is counted: reasoning removed, the first non-empty line (lines as
    `str.splitlines` cuts them), whitespace runs collapsed, one pair of matching outer quotes
    dropped. Case and punctuation are kept (`Paris.` and `Paris` differ); "" when nothing is
    left."""
    line = next((part.strip() for part in strip_reasoning(text).splitlines() if part.strip()), "")
    answer = collapse_whitespace(line)
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "'\"":
        answer = answer[1:-1].strip()
    return answer
