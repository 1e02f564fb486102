"""Open-ended random generation (docs/benchmarks/open_random.md): does the model spread its answers
when asked for "a random city"?

Per prompt and checkpoint, two figures: the top-90% support of the first answer token, exact from
one forward pass (how many tokens hold 90% of its mass; other thresholds recorded too), and the
unique fraction of 100 sampled answers (distinct normalized non-empty answers over all samples).
With `ssot` on, the prompts go through String Seed of Thought (docs/benchmarks/ssot.md) and only
the unique fraction is measured.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibft.config import option
from calibft.eval.contract import Item
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.prompting import ssot
from calibft.eval.text import has_think_tag, normalize_open_answer
from calibft.files import atomic_write_text
from calibft.splits import evenly_spaced

if TYPE_CHECKING:
    from calibft.lm import LM

NAME = "open_random"
DESCRIPTION = (
    "open-ended random answers (102 prompts): first-token top-90% support, unique fraction"
)

PRIMARY_THRESHOLD = 0.9
# Every recorded support threshold: 0.01, 0.05, 0.10, ..., 0.95 and 0.99.
THRESHOLDS = (0.01, *(round(0.05 * k, 2) for k in range(1, 20)), 0.99)
TOP_FIRST_TOKENS = 10
# The prompts whose top answers the paper shows (its Fig. 10); the plots show them when evaluated.
SHOWCASE_CATEGORIES = ("city", "mammal", "weekday")
_PROMPT_SHAPE = re.compile(
    r"(?:Think of|Choose|Name|Pick) a random (.+)\. Output ONLY the answer\."
)


def threshold_key(threshold: float) -> str:
    """The record key of a support threshold: 0.9 -> "p_0p9", 0.05 -> "p_0p05"."""
    return "p_" + f"{threshold:g}".replace(".", "p")


def load_prompts() -> list[str]:
    """The 102 prompts, in their fixed order (a prompt's index is its id)."""
    text = (resources.files("calibft") / "data" / "open_random_gen_prompts.json").read_text("utf-8")
    return list(json.loads(text))


def category(prompt: str) -> str:
    """What a prompt asks for ("city" for "Name a random city. Output ONLY the answer.")."""
    match = _PROMPT_SHAPE.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not an open-ended random-generation prompt: {prompt!r}")
    return match.group(1)


@dataclass
class Config(ssot.SSOTOptions):
    """Settings of the open-ended benchmark (defaults: the paper's evaluation)."""

    prompts: int = option(
        0, "evaluate this many evenly spaced prompts of the 102 (0: all)", min=0, cache_key=False
    )
    categories: list[str] = option(
        [],
        "evaluate only the prompts asking for these categories, e.g. city,weekday,mammal",
        cache_key=False,
    )
    samples: int = option(100, "generations per prompt", min=1)
    max_new_tokens: int | None = option(
        None, "generation length limit in tokens (default: 16; 4096 with --ssot)", min=1
    )
    support: bool | None = option(
        None,
        "measure the first-token support from one forward pass (default: on; SSOT cannot have it)",
    )

    def __post_init__(self) -> None:
        # SSOT answers after a random string and reasoning: it needs far more tokens.
        ssot.fill_mode_defaults(
            self,
            {"max_new_tokens": 16, "support": True},
            {"max_new_tokens": 4096, "support": False},
        )

    def check(self) -> None:
        if self.ssot and self.support:
            raise ValueError(
                "--ssot measures the unique fraction only: the first-token support of a prompt "
                "that starts with a random string means nothing (drop --support)"
            )


@dataclass(frozen=True)
class PromptJob:
    prompt_id: int
    prompt: str
    category: str


def items(config: Config) -> list[Item[PromptJob]]:
    jobs = [PromptJob(i, p, category(p)) for i, p in enumerate(load_prompts())]
    unknown = [c for c in config.categories if c not in {job.category for job in jobs}]
    if unknown:
        raise ValueError(
            f"unknown open_random categories {', '.join(unknown)}; e.g. city, weekday, mammal"
        )
    if config.categories:
        jobs = [job for job in jobs if job.category in config.categories]
    jobs = evenly_spaced(jobs, config.prompts)
    return [Item((job.prompt,), job.category, job) for job in jobs]


def top_p_supports(probs: Any, thresholds: Sequence[float]) -> list[int]:
    """For each threshold τ, how many of the most probable tokens it takes for their mass to reach
    τ: 1 + the first index where the descending cumulative sum is >= τ (the full length when
    rounding keeps it below τ). `probs`: a 1-D distribution (array or CPU tensor)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be a non-empty 1-D array of finite, non-negative numbers")
    if not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"support thresholds must lie in (0, 1], got {list(thresholds)}")
    cumulative = np.cumsum(np.sort(p)[::-1])
    # side="left": the first index whose cumulative mass is >= τ (cumsums never decrease).
    first = np.searchsorted(cumulative, np.asarray(thresholds, dtype=np.float64), side="left")
    return [int(min(i + 1, p.size)) for i in first]


def unique_fraction(outputs: Sequence[str]) -> float:
    """Distinct non-empty strings over all outputs: an empty output counts in the denominator
    only (it is a failed answer, not a distinct one)."""
    if not outputs:
        raise ValueError("unique_fraction needs at least one output")
    return len({o for o in outputs if o}) / len(outputs)


def first_token_figures(lm: LM, state: Any) -> dict[str, Any]:
    """The support sizes of the first answer token's distribution at every threshold, and its most
    probable tokens. The softmax runs over the whole logits row (padding rows included)."""
    import torch

    probs = lm.next_token_logprobs(state).exp().cpu()
    sizes = dict(
        zip(map(threshold_key, THRESHOLDS), top_p_supports(probs, THRESHOLDS), strict=True)
    )
    top = torch.topk(probs, min(TOP_FIRST_TOKENS, probs.numel()))
    return {
        "support_90": sizes[threshold_key(PRIMARY_THRESHOLD)],
        "support_by_threshold": sizes,
        "first_tokens": [
            [lm.decode([int(t)]), float(p)] for p, t in zip(top.values, top.indices, strict=True)
        ],
    }


def run_item(
    lm: LM, item: Item[PromptJob], config: Config, state: None, seed: int
) -> dict[str, Any]:
    prompt = lm.prefill(_prompt_ids(lm, item, config))
    max_tokens = int(config.max_new_tokens)  # type: ignore[arg-type]  # set by __post_init__
    completions = lm.sample(prompt, config.samples, seed=seed, max_new_tokens=max_tokens)
    return _record(lm, item, config, prompt, completions)


def run_batch(
    lm: LM, items: Sequence[Item[PromptJob]], config: Config, state: None, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """`run_item` of several prompts, their samples drawn together (the first-token support of
    each from its own prefill, one forward pass)."""
    prompts = [_prompt_ids(lm, item, config) for item in items]
    max_tokens = int(config.max_new_tokens)  # type: ignore[arg-type]  # set by __post_init__
    completions = lm.sample_many(prompts, [config.samples] * len(items), seeds, max_tokens)
    return [
        _record(lm, item, config, lm.prefill(ids) if config.support else None, c)
        for item, ids, c in zip(items, prompts, completions, strict=True)
    ]


def _prompt_ids(lm: LM, item: Item[PromptJob], config: Config) -> list[int]:
    prompt = item.payload.prompt
    return ssot.prompt_ids(lm.chat, prompt, ssot.DAG) if config.ssot else lm.chat.prompt_ids(prompt)


def _record(
    lm: LM,
    item: Item[PromptJob],
    config: Config,
    prompt: Any,
    completions: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """One prompt's record from its samples (and its prefilled `prompt` for the support)."""
    job = item.payload
    max_tokens = int(config.max_new_tokens)  # type: ignore[arg-type]  # set by __post_init__
    record: dict[str, Any] = {
        "prompt_id": job.prompt_id,
        "prompt": job.prompt,
        "category": job.category,
    }
    record.update(first_token_figures(lm, prompt) if config.support else {"support_90": None})
    raw = [lm.decode(c, special=False).strip() for c in completions]
    answers = raw
    if config.ssot:
        answers, degraded = ssot.extract_answers(raw, strict=config.ssot_strict, chat=lm.chat)
        record.update(ssot_answers=answers, ssot_degraded_count=sum(degraded))
    normalized = [normalize_open_answer(a) for a in answers]
    counts = Counter(n for n in normalized if n)
    record.update(
        samples=len(normalized),
        num_unique=len(counts),
        unique_fraction=unique_fraction(normalized),
        empty_output_count=normalized.count(""),
        think_tag_count=sum(map(has_think_tag, raw)),
        truncated_count=sum(len(c) >= max_tokens for c in completions),
        output_counts=dict(counts.most_common()),
        raw_outputs=raw,
        normalized_outputs=normalized,
    )
    return record


def _four(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def summarize(records: Sequence[Mapping[str, Any]], state: None) -> dict[str, Any]:
    """One checkpoint's figures over its prompts (each prompt weighs the same); the support
    figures are null under SSOT, which cannot measure them."""
    support = _four([r["support_90"] for r in records if r.get("support_90") is not None])
    fractions = [r["unique_fraction"] for r in records]
    by_threshold = {
        key: _four(
            [r["support_by_threshold"][key] for r in records if r.get("support_by_threshold")]
        )
        for key in map(threshold_key, THRESHOLDS)
    }
    summary: dict[str, Any] = {
        "prompts_evaluated": len(records),
        "mean_support_90": support["mean"],
        "median_support_90": support["median"],
        "min_support_90": support["min"],
        "max_support_90": support["max"],
        "mean_unique_fraction": statistics.fmean(fractions),
        "median_unique_fraction": float(statistics.median(fractions)),
        "mean_num_unique": statistics.fmean(r["num_unique"] for r in records),
        "total_empty_outputs": sum(r["empty_output_count"] for r in records),
        "prompts_with_empty_outputs": sum(r["empty_output_count"] > 0 for r in records),
        "total_outputs_with_think_tags": sum(r["think_tag_count"] for r in records),
        "prompts_with_think_tags": sum(r["think_tag_count"] > 0 for r in records),
        "total_truncated_outputs": sum(r["truncated_count"] for r in records),
    }
    if any("ssot_degraded_count" in r for r in records):
        degraded = sum(r.get("ssot_degraded_count", 0) for r in records)
        summary["ssot_degraded_rate"] = degraded / sum(r["samples"] for r in records)
    summary["support_by_threshold"] = by_threshold
    summary["prompts"] = [
        {
            "prompt": r["prompt"],
            "support_90": r.get("support_90"),
            "unique_fraction": r["unique_fraction"],
        }
        for r in records
    ]
    return summary


# Bulky per-sample lists stay in the per-item cache.
REPORT_FIELDS = (
    "checkpoint",
    "group",
    "prompt_id",
    "prompt",
    "category",
    "support_90",
    "support_by_threshold",
    "first_tokens",
    "num_unique",
    "unique_fraction",
    "empty_output_count",
    "think_tag_count",
    "truncated_count",
    "ssot_degraded_count",
    "output_counts",
)
TABLE_FIELDS = (
    ("top-90% first-token support", "support_90"),
    ("unique fraction", "unique_fraction"),
)
# The figures of the paper's Table 1 this benchmark gives.
HEADLINE = (
    ("support size (mean)", "mean_support_90"),
    ("unique rate (mean)", "mean_unique_fraction"),
)


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """Per-prompt support of each adapter against the base model (log axes, the paper's Fig. 9),
    the top answers of a few prompts per checkpoint (its Fig. 10), and a per-prompt CSV."""
    names = list(result["checkpoints"])
    by_prompt: dict[str, dict[str, Mapping[str, Any]]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], {})[record["checkpoint"]] = record
    written = [_write_csv(directory / "open_random_per_prompt.csv", records)]
    if len(names) > 1 and any(r.get("support_90") is not None for r in records):
        written.append(_plot_support(directory / "open_random_support.png", names, by_prompt))
    written.append(_plot_top_answers(directory / "open_random_top_answers.png", names, by_prompt))
    return written


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    columns = [
        "checkpoint",
        "prompt_id",
        "category",
        "prompt",
        "support_90",
        "num_unique",
        "unique_fraction",
        "empty_output_count",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buffer.getvalue())
    return path


def _plot_support(
    path: Path, names: Sequence[str], by_prompt: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> Path:
    base, adapters = names[0], names[1:]
    fig = new_figure(figsize=(3.8 * len(adapters), 3.8))
    for ax, name in zip(fig.subplots(1, len(adapters), squeeze=False)[0], adapters, strict=True):
        pairs = [
            (p[base]["support_90"], p[name]["support_90"])
            for p in by_prompt.values()
            if base in p and name in p and p[base].get("support_90") and p[name].get("support_90")
        ]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.scatter(xs, ys, s=12, alpha=0.7)
        top = max([*xs, *ys, 2])
        ax.plot([1, top], [1, top], "k--", lw=0.8)
        above = sum(y > x for x, y in pairs)
        ax.set_title(f"{name}: support up on {above}/{len(pairs)} prompts", fontsize=9)
        ax.set_xlabel(f"{base} top-90% support (first token)")
        ax.set_ylabel(f"{name} top-90% support")
    save_figure(fig, path)
    return path


def showcase_answers(
    counts_by_name: Mapping[str, Mapping[str, int]], per_state: int = 10, shown: int = 15
) -> list[str]:
    """The answers worth showing for one prompt: each checkpoint's `per_state` most frequent,
    ranked by their peak count over checkpoints, then by their total count; the first `shown`."""
    pool = {
        a for counts in counts_by_name.values() for a, _ in Counter(counts).most_common(per_state)
    }
    peak = {a: max(c.get(a, 0) for c in counts_by_name.values()) for a in pool}
    total = {a: sum(c.get(a, 0) for c in counts_by_name.values()) for a in pool}
    return sorted(pool, key=lambda a: (-peak[a], -total[a], a))[:shown]


def _label(answer: str, width: int = 28) -> str:
    """An answer as a tick label, characters the plot font may lack (control characters, the
    replacement character of undecodable bytes, scripts other than Latin) shown as '?'."""
    return "".join(c if c.isprintable() and ord(c) < 0x250 else "?" for c in answer[:width])


def _plot_top_answers(
    path: Path, names: Sequence[str], by_prompt: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> Path:
    prompts = [
        p for p, r in by_prompt.items() if next(iter(r.values()))["category"] in SHOWCASE_CATEGORIES
    ]
    prompts = prompts or evenly_spaced(list(by_prompt), len(SHOWCASE_CATEGORIES))
    fig = new_figure(figsize=(4.6 * len(prompts), 5.0))
    for ax, prompt in zip(fig.subplots(1, len(prompts), squeeze=False)[0], prompts, strict=True):
        records = by_prompt[prompt]
        counts = {n: records[n]["output_counts"] for n in names if n in records}
        answers = showcase_answers(counts)
        height = 0.8 / max(1, len(counts))
        for i, (name, c) in enumerate(counts.items()):
            share = [c.get(a, 0) / records[name]["samples"] for a in answers]
            ax.barh([k + i * height for k in range(len(answers))], share, height, label=name)
        labels = [_label(a) for a in answers]
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(answers))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of samples")
        ax.set_title(prompt, fontsize=8)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return path
