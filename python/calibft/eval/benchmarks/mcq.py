"""MCQ answer-position balance (docs/benchmarks/mcq.md): asked to write a medical multiple-choice
question whose correct answer is evenly spread over A-D, does the model spread it?

One fixed prompt is answered `samples` times (1000 by default, each up to 256 tokens); every
generation is read by the strict parser (`parse_mcq`). Figures, pooled over all generations of a
checkpoint: the parse rate, the answer-letter counts of the parseable ones, their total variation
from uniform (null when none parses) and a chi-square test against uniform.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibft.config import option
from calibft.eval.contract import Item
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.text import collapse_whitespace, strip_reasoning

if TYPE_CHECKING:
    from calibft.lm import LM

NAME = "mcq"
DESCRIPTION = (
    "MCQ answer-position balance: parse rate and TV from uniform of the correct letter "
    "(1000 generations)"
)

# The whole prompt is the user message, trailing newline included (docs/benchmarks/mcq.md §1 gives
# its SHA-256); its lines are the paper's, so they keep their length.
PROMPT = """You are a medical education expert who creates high-quality multiple-choice questions for medical students and professionals.

Please generate a medical multiple-choice question (single answer, 4 options). The question should cover medical knowledge and be of moderate difficulty.

Please strictly follow this format:
Question: [Question content]
A. [Option A content]
B. [Option B content]
C. [Option C content]
D. [Option D content]
Correct Answer: [A/B/C/D]
Explanation: [Brief explanation]

Requirements:
(1) The question should have practical medical value.
(2) All four options should be plausible with reasonable distractors.
(3) Only one correct answer.
(4) Output directly without any additional content.
(5) Cover different medical knowledge areas (e.g., internal medicine, surgery, pharmacology, pathology, diagnostics).
(6) The correct answer should be evenly distributed among A, B, C, D options to avoid bias toward any particular option.
"""  # noqa: E501

# Generations per cached shard: an interrupted run loses at most one shard, and a larger
# `samples` reuses the shards a smaller run already made.
CHUNK = 100
EXAMPLES_PER_CHUNK = 3


@dataclass
class Config:
    """Settings of the MCQ benchmark (defaults: the paper's evaluation)."""

    # Which shards run, not what a shard holds: not part of the cache key.
    samples: int = option(1000, "generations of the question prompt", min=1, cache_key=False)
    max_new_tokens: int = option(256, "generation length limit in tokens", min=1)


def items(config: Config) -> list[Item[None]]:
    """The one prompt, its sample budget split into shards of CHUNK generations."""
    return [Item(("chunk",), "mcq", samples=config.samples, shard_size=CHUNK)]


def run_item(lm: LM, item: Item[None], config: Config, state: None, seed: int) -> dict[str, Any]:
    """One shard of generations, each parsed (a failure is counted, never raised)."""
    assert item.shard is not None, "the runner runs mcq's item shard by shard"
    prompt = lm.prefill(lm.chat.prompt_ids(PROMPT))
    completions = lm.sample(
        prompt, item.shard.count, seed=seed, max_new_tokens=config.max_new_tokens
    )
    return _record(lm, config, completions)


def run_batch(
    lm: LM, items: Sequence[Item[None]], config: Config, state: None, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """`run_item` of several shards, their generations drawn together (one prompt prefill)."""
    counts = [item.shard.count for item in items if item.shard is not None]
    assert len(counts) == len(items), "the runner runs mcq's item shard by shard"
    prompt = lm.chat.prompt_ids(PROMPT)
    completions = lm.sample_many([prompt] * len(items), counts, seeds, config.max_new_tokens)
    return [_record(lm, config, c) for c in completions]


def _record(lm: LM, config: Config, completions: Sequence[Sequence[int]]) -> dict[str, Any]:
    """One shard's record: its generations parsed (a failure is counted, never raised)."""
    texts = [lm.decode(c, special=False).strip() for c in completions]
    parsed = [parse_mcq(text) for text in texts]
    return {
        "generations": len(parsed),
        "parseable_count": sum(p.parseable for p in parsed),
        "examples": texts[:EXAMPLES_PER_CHUNK],
        "parseable": [p.parseable for p in parsed],
        "answers": [p.answer for p in parsed],
        "errors": [list(p.errors) for p in parsed],
        "unique_options": [p.unique_options for p in parsed],
        "truncated": [len(c) >= config.max_new_tokens for c in completions],
        "texts": texts,
    }


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
    cleaned = strip_reasoning(text).strip()
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
                question = collapse_whitespace(line.partition(":")[2])
        elif line[:2] in {f"{letter}." for letter in MCQ_LETTERS}:
            letter = line[0]
            if letter in options:
                errors.append(f"duplicate_option_{letter.lower()}")
            else:
                options[letter] = collapse_whitespace(line[2:])
        elif line.startswith("Correct Answer:"):
            if stated is not None:
                errors.append("duplicate_correct_answer")
            else:
                stated = collapse_whitespace(line.partition(":")[2])
        elif line.startswith("Explanation:"):
            if explanation is not None:
                errors.append("duplicate_explanation")
            else:
                explanation = collapse_whitespace(line.partition(":")[2])
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


def tv_from_uniform(counts: Any) -> float | None:
    """Total variation between the frequencies of `counts` (a sequence, or a mapping's values) and
    the uniform law over its categories: ½ Σ |f_x − 1/k|. None when the counts total 0."""
    values = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    c = np.asarray(values, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be a non-empty list of finite, non-negative counts")
    total = float(c.sum())
    if total == 0:
        return None
    return float(0.5 * np.abs(c / total - 1.0 / c.size).sum())


def chi_square_uniform(counts: Sequence[int]) -> tuple[float | None, float | None]:
    """Pearson's chi-square statistic against equal expected counts, and its p-value
    (k - 1 degrees of freedom); both None when the counts total 0."""
    if sum(counts) == 0:
        return None, None
    from scipy.stats import chisquare

    result = chisquare(counts)
    return float(result.statistic), float(result.pvalue)


def letter_figures(counts: Mapping[str, int]) -> dict[str, Any]:
    """Balance figures of the correct-answer letters of the parseable generations."""
    total = sum(counts.values())
    frequencies = {k: (v / total if total else None) for k, v in counts.items()}
    statistic, p_value = chi_square_uniform(list(counts.values()))
    deviation = max(abs(f - 1 / len(counts)) for f in frequencies.values()) if total else None  # type: ignore[operator]
    return {
        "letter_counts": dict(counts),
        "letter_frequencies": frequencies,
        "tv": tv_from_uniform(counts),
        "max_abs_deviation": deviation,
        "chi2_statistic": statistic,
        "chi2_p_value": p_value,
    }


def summarize(records: Sequence[Mapping[str, Any]], state: None) -> dict[str, Any]:
    """Pooled over every generation of one checkpoint (the shards are not groups)."""
    n = sum(r["generations"] for r in records)
    parseable = [ok for r in records for ok in r["parseable"]]
    answers = [a for r in records for a in r["answers"]]
    counts = Counter({letter: 0 for letter in MCQ_LETTERS})
    counts.update(a for ok, a in zip(parseable, answers, strict=True) if ok)
    errors = Counter(e for r in records for errs in r["errors"] for e in set(errs))
    return {
        "generations": n,
        "parse_rate": sum(parseable) / n,
        **letter_figures({letter: counts[letter] for letter in MCQ_LETTERS}),
        "valid_correct_answer_rate": sum(a is not None for a in answers) / n,
        "unique_options_rate": sum(ok for r in records for ok in r["unique_options"]) / n,
        "truncated_rate": sum(t for r in records for t in r["truncated"]) / n,
        # How many generations show each error (one generation may show several).
        "error_counts": dict(errors.most_common()),
    }


# The per-generation lists stay in the cache; report.json keeps a few example texts per shard.
REPORT_FIELDS = ("checkpoint", "group", "generations", "parseable_count", "examples")
# The figures of the paper's Table 1 this benchmark gives.
HEADLINE = (("parse rate", "parse_rate"), ("TV from uniform", "tv"))


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """The correct-answer letter frequencies of every checkpoint against uniform (1/4)."""
    names = list(result["checkpoints"])
    fig = new_figure(figsize=(max(4.5, 1.4 * len(names) + 2.5), 3.4))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        summary = result["checkpoints"][name]
        shares = [summary["letter_frequencies"][k] or 0.0 for k in MCQ_LETTERS]
        parsed = sum(summary["letter_counts"].values())
        ax.bar(
            [k - 0.4 + (i + 0.5) * width for k in range(len(MCQ_LETTERS))],
            shares,
            width,
            label=f"{name} (parse rate {summary['parse_rate']:.2f}, n={parsed})",
        )
    ax.axhline(1 / len(MCQ_LETTERS), color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(MCQ_LETTERS)), MCQ_LETTERS)
    ax.set_ylabel("share of parseable questions")
    ax.set_title("correct-answer letter (dashed: uniform)", fontsize=9)
    ax.legend(fontsize=7)
    path = directory / "mcq_letters.png"
    save_figure(fig, path)
    return [path]
