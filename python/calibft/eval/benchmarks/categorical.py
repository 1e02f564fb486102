"""Categorical targets (docs/benchmarks/categorical.md): does the model answer a weighted list?

Per prompt and checkpoint, exactly: the model's probability of every listed answer, from one
tree-attention pass over the answers' trie; the valid mass (their sum), the total variation and
KL(target || model renormalized on the list). By sampling: N generations matched to the list after
normalization, giving the sampled valid rate and TV. The sampled valid rate minus the exact valid
mass is the mass on answers that match a listed one only after normalization (other spellings,
other tokenizations of the same text).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibft.config import option
from calibft.eval.contract import Item
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.report import format_value, group_aggregates, safe_filename
from calibft.eval.text import normalize_open_answer
from calibft.lm.layout import DEFAULT_CHUNK_SIZE, TrieLayout
from calibft.splits import evenly_spaced
from calibft.targets import Target, TrieTokenizer, build_tries
from calibft.targets.categorical import check_answers, load_target_files

if TYPE_CHECKING:
    from calibft.lm import LM

NAME = "categorical"
DESCRIPTION = (
    "weighted lists of answers: exact answer probabilities, valid mass, TV, KL; sampled rate, TV"
)

DEFAULT_TARGETS = ("shipped:heldout",)
MAX_BARS = 30
"""Answers shown per bar chart (the largest target weights, in list order)."""
UNMATCHED_SHOWN = 5


@dataclass
class Config:
    """Settings of the categorical benchmark."""

    targets: list[str] = option(
        [],
        "categorical target files (JSONL, JSON or YAML; docs/targets.md), comma-separated "
        "(default: the shipped held-out set, shipped:heldout)",
        cache_key=False,
    )
    per_group: int = option(
        0, "evaluate this many evenly spaced prompts per group (0: all)", min=0, cache_key=False
    )
    samples: int = option(200, "generations per prompt (0: the exact pass only)", min=0)
    max_new_tokens: int = option(
        16, "generation length limit in tokens (at least the longest answer's, end included)", min=1
    )
    case_insensitive: bool = option(False, "match generations to the listed answers ignoring case")
    exact_chunk_size: int = option(
        DEFAULT_CHUNK_SIZE, "trie nodes per packed forward pass", min=1, cache_key=False
    )


# Summary figure -> (per-prompt field, statistic over group means).
AGGREGATES = {
    "mean_exact_tv": ("exact_tv", statistics.fmean),
    "mean_exact_valid_mass": ("exact_valid_mass", statistics.fmean),
    "mean_exact_kl": ("exact_kl", statistics.fmean),
    "mean_sampled_tv": ("sampled_tv", statistics.fmean),
    "mean_sampled_valid_rate": ("sampled_valid_rate", statistics.fmean),
    "mean_valid_gap": ("valid_gap", statistics.fmean),
}
REPORT_FIELDS = (
    "checkpoint",
    "group",
    "section",
    "prompt",
    "target",
    "exact_tv",
    "exact_valid_mass",
    "exact_kl",
    "exact_probs",
    "samples",
    "sampled_valid_rate",
    "sampled_tv",
    "valid_gap",
    "sample_counts",
    "unmatched",
    "examples",
)
TABLE_FIELDS = (
    ("exact TV", "exact_tv"),
    ("exact valid mass", "exact_valid_mass"),
    ("exact KL", "exact_kl"),
    ("sampled TV", "sampled_tv"),
    ("sampled valid rate", "sampled_valid_rate"),
    ("valid gap (sampled - exact)", "valid_gap"),
)
# The before/after columns (headline table, model card).
HEADLINE = (("mean exact TV", "mean_exact_tv"), ("mean exact valid mass", "mean_exact_valid_mass"))


@dataclass(frozen=True)
class PromptJob:
    """A target with everything its evaluation needs besides the model."""

    prompt_ids: list[int]
    trie: Any
    layout: TrieLayout
    answer_of: dict[str, int]  # normalized answer -> its index in the list


def items(config: Config) -> list[Item[Target]]:
    """One item per listed prompt; files are read and validated here, before any model loads."""
    targets = load_target_files(config.targets or list(DEFAULT_TARGETS))
    targets = evenly_spaced(targets, config.per_group, group=lambda t: t.group)
    return [Item(t.key, t.group, t) for t in targets]


def normalize(text: str, case_insensitive: bool) -> str:
    """A generation (or a listed answer) as matched: `normalize_open_answer`'s rules (first
    non-empty line, whitespace collapsed, outer quotes dropped), then case folded if asked."""
    answer = normalize_open_answer(text)
    return answer.casefold() if case_insensitive else answer


class PromptJobs:
    """The run's shared state: tokenizer checks, tries and layouts of every prompt of the run,
    made once for all checkpoints when the first prompt runs (before its first generation)."""

    def __init__(self, config: Config, items: Sequence[Item[Target]]) -> None:
        self.config = config
        self.targets = [item.payload for item in items]
        self.jobs: dict[tuple[Any, ...], PromptJob] | None = None

    def job(self, lm: LM, target: Target) -> PromptJob:
        if self.jobs is None:
            self.jobs = self._build(lm)
        return self.jobs[target.key]

    def _build(self, lm: LM) -> dict[tuple[Any, ...], PromptJob]:
        config, targets = self.config, self.targets
        check_answers(
            targets,
            lm.chat.tokenizer,
            chat=lm.chat,
            max_seq_len=lm.max_positions,
            limit_name="the model's max_position_embeddings",
        )
        tries = build_tries(
            [t.space() for t in targets], TrieTokenizer.from_hf(lm.chat.tokenizer, lm.chat)
        )
        jobs = {}
        for target, trie in zip(targets, tries, strict=True):
            longest = int(trie.depths().max())
            if config.samples and longest > config.max_new_tokens:
                raise ValueError(
                    f"{target.source}: max_new_tokens={config.max_new_tokens} is shorter than the "
                    f"longest answer ({longest} tokens with its end token); raise max_new_tokens"
                )
            answer_of: dict[str, int] = {}
            for index, answer in enumerate(target.answers):
                key = normalize(answer, config.case_insensitive)
                if key in answer_of:
                    raise ValueError(
                        f"{target.source}: targets: {target.answers[answer_of[key]]!r} and "
                        f"{answer!r} cannot be told apart once generations are normalized"
                        + (" (case_insensitive is on)" if config.case_insensitive else "")
                    )
                answer_of[key] = index
            jobs[target.key] = PromptJob(
                lm.chat.prompt_ids(target.prompt), trie, TrieLayout.from_trie(trie), answer_of
            )
        return jobs


def setup(config: Config, items: Sequence[Item[Target]]) -> PromptJobs:
    return PromptJobs(config, items)


def exact_figures(logprobs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Valid mass, TV and KL(target || model renormalized on the list) from the model's
    log-probability of every listed answer (`target`: the weights, summing to 1)."""
    log_mass = float(np.logaddexp.reduce(logprobs))
    renormalized = np.exp(logprobs - log_mass)
    support = target > 0
    return {
        "exact_valid_mass": float(np.exp(log_mass)),
        "exact_tv": float(0.5 * np.abs(renormalized - target).sum()),
        "exact_kl": float(
            np.sum(target[support] * (np.log(target[support]) - (logprobs[support] - log_mass)))
        ),
    }


def sampled_figures(
    texts: Sequence[str],
    ended: Sequence[bool],
    target: Target,
    job: PromptJob,
    case_insensitive: bool,
) -> dict[str, Any]:
    """Sampled valid rate and TV: a generation counts for the listed answer it equals after
    normalization, if it ended within the token limit."""
    answers = target.answers
    counts = np.zeros(len(answers))
    unmatched: Counter[str] = Counter()
    for text, done in zip(texts, ended, strict=True):
        key = normalize(text, case_insensitive)
        index = job.answer_of.get(key) if done else None
        if index is None:
            unmatched[key if done else key + " [cut at max_new_tokens]"] += 1
        else:
            counts[index] += 1
    matched = counts.sum()
    return {
        "samples": len(texts),
        "sampled_valid_rate": float(matched / len(texts)),
        "sampled_tv": float(0.5 * np.abs(counts / matched - target.probs).sum())
        if matched
        else None,
        "sample_counts": dict(zip(answers, counts.astype(int).tolist(), strict=True)),
        "unmatched": unmatched.most_common(UNMATCHED_SHOWN),
    }


def run_item(
    lm: LM, item: Item[Target], config: Config, state: PromptJobs, seed: int
) -> dict[str, Any]:
    """Exact and sampled figures of one prompt under one checkpoint."""
    target = item.payload
    job = state.job(lm, target)
    prompt = lm.prefill(job.prompt_ids)
    logprobs = job.layout.value_logprobs(
        lm.trie_logprobs(prompt, job.layout, chunk_size=config.exact_chunk_size)
    )
    record: dict[str, Any] = {
        "prompt": target.prompt,
        "target": dict(zip(target.answers, target.probs.tolist(), strict=True)),
        **exact_figures(logprobs, target.probs),
        "exact_probs": dict(zip(target.answers, np.exp(logprobs).tolist(), strict=True)),
        "samples": 0,
        "sampled_valid_rate": None,
        "sampled_tv": None,
        "valid_gap": None,
        "sample_counts": None,
        "unmatched": None,
        "examples": [],
    }
    if config.samples:
        completions = lm.sample(
            prompt, config.samples, seed=seed, max_new_tokens=config.max_new_tokens
        )
        texts = [lm.decode(ids) for ids in completions]
        # A completion that filled the limit never produced an end token: it is no listed answer.
        ended = [len(ids) < config.max_new_tokens for ids in completions]
        record.update(
            sampled_figures(texts, ended, target, job, config.case_insensitive),
            examples=texts[:5],
        )
        record["valid_gap"] = record["sampled_valid_rate"] - record["exact_valid_mass"]
    return record


def summarize(records: Sequence[Mapping[str, Any]], state: PromptJobs) -> dict[str, Any]:
    """The AGGREGATES over group means."""
    return group_aggregates(records, AGGREGATES)


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """One bar chart per prompt: the target weights, and every checkpoint's exact probabilities
    renormalized on the list (the legend gives each checkpoint's valid mass)."""
    prompts: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        prompts.setdefault((record["group"], record["prompt"]), []).append(record)
    written = []
    for index, ((group, prompt), chosen) in enumerate(prompts.items()):
        target = chosen[0]["target"]
        shown = sorted(sorted(target, key=lambda a: -target[a])[:MAX_BARS], key=list(target).index)
        x = np.arange(len(shown))
        width = 0.8 / (len(chosen) + 1)
        fig = new_figure(figsize=(max(5.0, 0.45 * len(shown) * (len(chosen) + 1) ** 0.5), 3.4))
        ax = fig.subplots()
        ax.bar(
            x - 0.4, [target[a] for a in shown], width, align="edge", color="0.3", label="target"
        )
        for i, record in enumerate(chosen, 1):
            mass = record["exact_valid_mass"] or 0.0
            probs = [record["exact_probs"][a] / mass if mass > 0 else 0.0 for a in shown]
            label = (
                f"{record['checkpoint']} (valid mass {format_value(record['exact_valid_mass'], 2)})"
            )
            ax.bar(x - 0.4 + i * width, probs, width, align="edge", color=f"C{i - 1}", label=label)
        ax.set_xticks(
            x,
            shown,
            rotation=45 if len(shown) > 6 else 0,
            ha="right" if len(shown) > 6 else "center",
            fontsize=8,
        )
        ax.set_ylabel("probability (renormalized on the list)")
        more = f" ({len(shown)} of {len(target)} answers)" if len(shown) < len(target) else ""
        ax.set_title(f"{group}: {prompt[:70]}{'...' if len(prompt) > 70 else ''}{more}", fontsize=8)
        ax.legend(fontsize=7)
        path = directory / f"categorical_{index:03d}_{safe_filename(group)}.png"
        save_figure(fig, path)
        written.append(path)
    return written
