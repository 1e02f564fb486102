"""NoveltyBench (docs/benchmarks/noveltybench.md): how many meaningfully different, useful answers
a model gives when asked the same open-ended question ten times.

Per prompt and checkpoint: 10 generations (temperature 1, up to 512 tokens); a greedy partition of
them into equivalence classes (a lexical rule for short answers, a similarity classifier for the
rest); each generation's reward-model score turned into a 1-10 rating; the utility, a
patience-discounted sum of the ratings of each class's first member. Summary per split (curated,
wildchat): mean distinct classes and mean utility over prompts.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibft.config import option
from calibft.eval.contract import Item
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.text import strip_reasoning
from calibft.lm import DTYPES
from calibft.splits import evenly_spaced

if TYPE_CHECKING:
    from calibft.eval.benchmarks.noveltybench.scorers import RewardModel, SimilarityClassifier
    from calibft.lm import LM, Checkpoint

# The paper's scorers (hub ids; `scorers` loads them).
PAPER_CLASSIFIER = "yimingzhang/deberta-v3-large-generation-similarity"
PAPER_REWARD_MODEL = "Skywork/Skywork-Reward-Gemma-2-27B-v0.2"

NAME = "noveltybench"
DESCRIPTION = (
    "distinct and useful answers over 10 generations: mean distinct and utility (NoveltyBench)"
)

# Split name -> (package data file, its row count).
SPLITS = {"curated": ("curated.jsonl", 100), "wildchat": ("wildchat_1k.jsonl", 1000)}

# Two responses of at most this many words are compared by their word sets alone.
LEXICAL_MAX_WORDS = 5
# The classifier calls a pair the same answer when P(same) exceeds this.
SIMILARITY_THRESHOLD = 0.102
# Raw reward -> rating 1-10: one plus the number of thresholds strictly below the reward.
RATING_THRESHOLDS = (-7.71875, -6.28125, -6.0, -5.71875, -5.5, -5.0, -4.375, -3.4375, -2.046875)
PATIENCE = 0.8

# Names that switch a scorer off.
_NONE = "none"


def _is_none(name: str) -> bool:
    return name.strip().lower() == _NONE


@dataclass
class Config:
    """Settings of NoveltyBench (defaults: the paper's evaluation)."""

    splits: list[str] = option(
        list(SPLITS),
        "prompt sets: curated, wildchat or both",
        choices=tuple(SPLITS),
        cache_key=False,
    )
    per_split: int = option(
        0, "evaluate this many evenly spaced prompts per split (0: all)", min=0, cache_key=False
    )
    samples: int = option(10, "generations per prompt", min=1)
    max_new_tokens: int = option(512, "generation length limit in tokens", min=1)
    classifier: str = option(
        PAPER_CLASSIFIER,
        "similarity classifier: HF id or local directory; none: the lexical rule only (pairs it "
        "cannot decide count as different; reported as mean_distinct_lexical, not mean_distinct)",
    )
    classifier_tokenizer: str | None = option(
        None,
        "tokenizer of the classifier (default: the classifier's directory if it holds one, else "
        "microsoft/deberta-v3-large)",
    )
    reward_model: str = option(
        PAPER_REWARD_MODEL, "reward model: HF id or local directory; none: distinctness only"
    )
    reward_dtype: str = option("bfloat16", "reward model dtype", choices=tuple(DTYPES))
    patience: float = option(
        PATIENCE,
        "utility discount per generation (0: only the first generation counts)",
        min=0,
        max=1,
    )
    scorer_device: str | None = option(
        None,
        "device of the classifier and reward model (default: the model's); auto spreads the reward "
        "model over the GPUs",
        cache_key=False,
    )

    def check(self) -> None:
        if not self.splits:
            raise ValueError(f"splits must name at least one of {', '.join(SPLITS)}")
        if _is_none(self.classifier) and not _is_none(self.reward_model):
            raise ValueError(
                "classifier none gives a lexical-only partition, on which utility must not be "
                "computed; also pass --reward-model none, or give a classifier"
            )


# ---- pure definitions ---------------------------------------------------------------------------


def lexically_equivalent(a: str, b: str) -> bool | None:
    """The verdict of the word-overlap rule, or None when the classifier must decide.

    Lowercased, stripped and split on whitespace; if the longer response has at most five words,
    the two are equivalent iff twice their shared distinct words reach its length (two empty
    responses are equivalent)."""
    words_a, words_b = a.strip().lower().split(), b.strip().lower().split()
    longest = max(len(words_a), len(words_b))
    if longest > LEXICAL_MAX_WORDS:
        return None
    return 2 * len(set(words_a) & set(words_b)) >= longest


# P(same) for each (anchor, other) pair; None: no classifier (lexical rule only).
Classify = Callable[[str, Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class Partition:
    """Class ids numbered by first appearance, and how many pairs the lexical rule left undecided
    (scored by the classifier, or counted as different without one)."""

    classes: list[int]
    classifier_pairs: int

    @property
    def distinct(self) -> int:
        return max(self.classes, default=-1) + 1


def partition(responses: Sequence[str], classify: Classify | None) -> Partition:
    """Greedy equivalence classes: each response not yet placed opens a class, and every later
    unplaced response joins it if judged equivalent to that opening response (never compared with
    other members)."""
    classes = [-1] * len(responses)
    pairs = 0
    opened = 0
    for i, anchor in enumerate(responses):
        if classes[i] >= 0:
            continue
        classes[i] = opened
        candidates = [j for j in range(i + 1, len(responses)) if classes[j] < 0]
        verdicts = {j: lexically_equivalent(anchor, responses[j]) for j in candidates}
        undecided = [j for j in candidates if verdicts[j] is None]
        pairs += len(undecided)
        if undecided and classify is not None:
            # The pairs of one anchor are independent of each other: one batch.
            scores = classify(anchor, [responses[j] for j in undecided])
            verdicts.update(
                {j: float(s) > SIMILARITY_THRESHOLD for j, s in zip(undecided, scores, strict=True)}
            )
        for j in candidates:
            if verdicts[j]:
                classes[j] = opened
        opened += 1
    return Partition(classes, pairs)


def rating(reward: float) -> int:
    """Rating 1-10 of a raw reward: a reward equal to a threshold falls in the lower bin."""
    if not math.isfinite(reward):
        raise ValueError(f"a reward must be a finite number, got {reward!r}")
    return bisect.bisect_left(RATING_THRESHOLDS, reward) + 1


def first_member_scores(
    classes: Sequence[int], ratings: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(generation scores, partition scores): a generation keeps its rating if it opens its class,
    else scores 0; the partition scores are the opening generations' ratings, one per class."""
    generation_scores: list[int] = []
    partition_scores: list[int] = []
    for cls, r in zip(classes, ratings, strict=True):
        first = cls == len(partition_scores)
        generation_scores.append(r if first else 0)
        if first:
            partition_scores.append(r)
    return generation_scores, partition_scores


def utility(scores: Sequence[float], patience: float = PATIENCE) -> float:
    """The patience-weighted mean of per-generation scores: sum p^g s_g / sum p^g, with p^0 = 1
    (so patience 0 gives the first generation's score alone)."""
    if not scores:
        raise ValueError("utility needs at least one generation score")
    if not 0 <= patience <= 1:
        raise ValueError(f"patience must be in [0, 1], got {patience!r}")
    weights = [1.0 if g == 0 else patience**g for g in range(len(scores))]
    return math.fsum(w * s for w, s in zip(weights, scores, strict=True)) / math.fsum(weights)


# ---- data and items -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    split: str
    id: str
    prompt: str
    category: str | None


def load_prompts(split: str) -> list[Prompt]:
    """A split's prompts (whitespace stripped), checked for their row count and unique ids."""
    filename, count = SPLITS[split]
    text = (resources.files("calibft") / "data" / "noveltybench" / filename).read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = [
        Prompt(split, str(r["id"]), str(r["prompt"]).strip(), r.get("category")) for r in rows
    ]
    if len(prompts) != count or len({p.id for p in prompts}) != count:
        raise ValueError(
            f"noveltybench data {filename} should hold {count} prompts with unique ids; "
            "reinstall calibft"
        )
    return prompts


def items(config: Config) -> list[Item[Prompt]]:
    chosen = [
        p
        for split in dict.fromkeys(config.splits)
        for p in evenly_spaced(load_prompts(split), config.per_split)
    ]
    # Curated prompts are grouped by category (report tables per category); WildChat is one group.
    return [Item((p.split, p.id), p.category or p.split, p, section=p.split) for p in chosen]


# ---- the run ------------------------------------------------------------------------------------


class Scorers:
    """The run's shared state: the similarity classifier and the reward model, loaded once for
    every checkpoint when the first prompt is scored (on ``scorer_device``, default the model's)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loaded: tuple[SimilarityClassifier | None, RewardModel | None] | None = None

    def get(self, lm: LM) -> tuple[SimilarityClassifier | None, RewardModel | None]:
        if self.loaded is None:
            from calibft.eval.benchmarks.noveltybench.scorers import (
                RewardModel,
                SimilarityClassifier,
                classifier_tokenizer_name,
            )

            config = self.config
            device = config.scorer_device or lm.device
            classifier = reward = None
            if not _is_none(config.classifier):
                tokenizer = classifier_tokenizer_name(
                    config.classifier, config.classifier_tokenizer
                )
                classifier = SimilarityClassifier.load(
                    config.classifier, tokenizer, lm.device if device == "auto" else device
                )
            if not _is_none(config.reward_model):
                reward = RewardModel.load(config.reward_model, device, DTYPES[config.reward_dtype])
            self.loaded = (classifier, reward)
        return self.loaded


def setup(config: Config, items: Sequence[Item[Prompt]]) -> Scorers:
    return Scorers(config)


def check(checkpoint: Checkpoint, config: Config) -> None:
    """Before any generation: refuse a classifier or reward model that cannot be loaded; warn when
    the reward model is not the one the rating thresholds were calibrated on."""
    from calibft.eval.benchmarks.noveltybench.scorers import (
        check_classifier,
        check_reward_model,
        classifier_tokenizer_name,
    )

    if not _is_none(config.classifier):
        check_classifier(
            config.classifier,
            classifier_tokenizer_name(config.classifier, config.classifier_tokenizer),
        )
    if not _is_none(config.reward_model):
        check_reward_model(config.reward_model)
        if config.reward_model != PAPER_REWARD_MODEL:
            warnings.warn(
                f"noveltybench: the rating thresholds were set for {PAPER_REWARD_MODEL}'s rewards; "
                f"with {config.reward_model!r} utilities are not comparable with the paper's "
                "(unless it is a local copy of it)",
                stacklevel=2,
            )


def clean_text(lm: LM, ids: Sequence[int]) -> str:
    """The answer as scored: special tokens skipped, reasoning removed, whitespace stripped."""
    return strip_reasoning(lm.decode(ids, special=False)).strip()


def run_item(
    lm: LM, item: Item[Prompt], config: Config, state: Scorers, seed: int
) -> dict[str, Any]:
    """Generate, partition and (with a reward model) score one prompt under one checkpoint."""
    completions = lm.sample(
        lm.prefill(lm.chat.prompt_ids(item.payload.prompt)),
        config.samples,
        seed=seed,
        max_new_tokens=config.max_new_tokens,
    )
    return _record(lm, item, config, state, seed, completions)


def run_batch(
    lm: LM, items: Sequence[Item[Prompt]], config: Config, state: Scorers, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """`run_item` of several prompts, their samples generated together."""
    completions = lm.sample_many(
        [lm.chat.prompt_ids(item.payload.prompt) for item in items],
        [config.samples] * len(items),
        seeds,
        config.max_new_tokens,
    )
    return [
        _record(lm, item, config, state, seed, c)
        for item, seed, c in zip(items, seeds, completions, strict=True)
    ]


def _record(
    lm: LM,
    item: Item[Prompt],
    config: Config,
    state: Scorers,
    seed: int,
    completions: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Partition and (with a reward model) score one prompt's generations."""
    prompt = item.payload
    classifier, reward = state.get(lm)
    texts = [clean_text(lm, ids) for ids in completions]
    parts = partition(texts, classifier.same_probability if classifier is not None else None)
    record: dict[str, Any] = {
        "split": prompt.split,
        "id": prompt.id,
        "prompt": prompt.prompt,
        "seed": seed,
        "generations": texts,
        "raw_generations": [lm.decode(ids) for ids in completions],
        "tokens": [len(ids) for ids in completions],
        "empty": sum(not t for t in texts),
        # Still generating at the length limit (the end token was never drawn).
        "truncated": sum(len(ids) >= config.max_new_tokens for ids in completions),
        "judge": "lexical" if classifier is None else "classifier",
        "partition": parts.classes,
        "distinct": parts.distinct,
        "classifier_pairs": parts.classifier_pairs,
        "raw_rewards": None,
        "ratings": None,
        "generation_scores": None,
        "partition_scores": None,
        "utility": None,
    }
    if reward is not None:
        rewards = reward.rewards(prompt.prompt, texts)
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(
                f"noveltybench: the reward model gave a non-finite reward on {prompt.id}; "
                "try --reward-dtype float32"
            )
        ratings = [rating(r) for r in rewards]
        generation_scores, partition_scores = first_member_scores(parts.classes, ratings)
        record.update(
            raw_rewards=rewards,
            ratings=ratings,
            generation_scores=generation_scores,
            partition_scores=partition_scores,
            utility=utility(generation_scores, config.patience),
        )
    return record


# ---- report -------------------------------------------------------------------------------------


def _mean(values: Sequence[Any]) -> float | None:
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def split_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over prompts. Without the classifier the distinct count is the lexical rule's alone and
    is reported as mean_distinct_lexical, leaving mean_distinct undefined."""
    lexical = any(r["judge"] == "lexical" for r in records)
    distinct = _mean([r["distinct"] for r in records])
    generations = sum(len(r["tokens"]) for r in records)
    return {
        "prompts": len(records),
        "mean_distinct": None if lexical else distinct,
        "mean_utility": _mean([r["utility"] for r in records]),
        "mean_distinct_lexical": distinct if lexical else None,
        "classifier_pairs_per_prompt": _mean([r["classifier_pairs"] for r in records]),
        "empty_rate": sum(r["empty"] for r in records) / generations if generations else None,
        "truncated_rate": sum(r["truncated"] for r in records) / generations
        if generations
        else None,
    }


SECTIONS = (*SPLITS, "all")


def summarize(records: Sequence[Mapping[str, Any]], state: Scorers) -> dict[str, Any]:
    """Per split, and pooled over every prompt of the run ("all") when it has several splits."""
    summary = {
        s: split_figures([r for r in records if r["split"] == s])
        for s in dict.fromkeys(r["split"] for r in records)
    }
    if len(summary) > 1:
        summary["all"] = split_figures(records)
    return summary


REPORT_FIELDS = (
    "checkpoint",
    "section",
    "group",
    "split",
    "id",
    "judge",
    "distinct",
    "partition",
    "classifier_pairs",
    "utility",
    "raw_rewards",
    "generation_scores",
    "partition_scores",
    "tokens",
    "empty",
    "truncated",
)
TABLE_FIELDS = (("distinct classes", "distinct"), ("utility", "utility"))
# Columns of the run's headline table (report.headline_table), as in the paper's Table 1.
HEADLINE = (
    ("curated distinct", "curated.mean_distinct"),
    ("curated utility", "curated.mean_utility"),
    ("WildChat distinct", "wildchat.mean_distinct"),
    ("WildChat utility", "wildchat.mean_utility"),
)


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """Per split, the histogram of distinct classes per prompt, one bar series per checkpoint."""
    from matplotlib.ticker import MaxNLocator

    written = []
    names = list(result["checkpoints"])
    for split in dict.fromkeys(r["split"] for r in records):
        mine = [r for r in records if r["split"] == split]
        top = max(len(r["tokens"]) for r in mine)
        counts = range(1, top + 1)
        fig = new_figure(figsize=(max(5.0, 0.5 * top * max(1, len(names))), 3.4))
        ax = fig.subplots()
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [r["distinct"] for r in mine if r["checkpoint"] == name]
            heights = [sum(v == c for v in values) for c in counts]
            ax.bar(
                [c - 0.4 + (i + 0.5) * width for c in counts],
                heights,
                width,
                label=name,
                color=f"C{i}",
            )
        lexical = any(r["judge"] == "lexical" for r in mine)
        ax.set_xticks(list(counts))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # prompt counts
        ax.set_xlabel("distinct classes per prompt" + (" (lexical rule only)" if lexical else ""))
        ax.set_ylabel("prompts")
        ax.set_title(f"NoveltyBench {split}")
        ax.legend(fontsize=7)
        path = directory / f"noveltybench_distinct_{split}.png"
        save_figure(fig, path)
        written.append(path)
    return written
