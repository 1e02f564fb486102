"""Structured sampling (docs/benchmarks/structured.md): does the model sample the requested law?

Per held-out prompt and checkpoint: the logit-level KL against the evaluation trie along sampled
target paths; N generations (temperature 1, top-p 1, pure ancestral sampling) parsed into the
valid rate and the (normalized) W1 of the valid values, with their KS or χ² test (`fit`);
optionally the exact model distribution over the canonical outputs (tree-attention pass,
`exact`). With `ssot` on, the prompts go through String Seed of Thought
(docs/benchmarks/ssot.md): sample metrics only, from the extracted answers.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibft.config import option
from calibft.eval.benchmarks.structured.answers import parse_samples
from calibft.eval.benchmarks.structured.exact import exact_distribution, histogram_of
from calibft.eval.benchmarks.structured.fit import FIELDS as GOF_FIELDS
from calibft.eval.benchmarks.structured.fit import goodness_of_fit, pass_summary
from calibft.eval.contract import Item
from calibft.eval.metrics import w1
from calibft.eval.prompting import ssot
from calibft.eval.report import Statistic, group_aggregates
from calibft.lm.layout import DEFAULT_CHUNK_SIZE, TrieLayout
from calibft.splits import HELD_OUT_SPLITS, SELECTIONS, PromptSpec, evenly_spaced, splits
from calibft.targets import TrieTokenizer, build_output_spaces, build_tries
from calibft.targets.numeric import MAX_BINS_LIMIT, MAX_DECIMALS

if TYPE_CHECKING:
    from calibft.lm import LM, Checkpoint

NAME = "structured"
DESCRIPTION = (
    "does the model sample the requested numeric law? valid rate, W1, logit KL, exact distribution"
)

SPLIT_CHOICES = {
    "ood": ("test_ood_family",),
    "unseen": ("test_unseen_params",),
    "both": HELD_OUT_SPLITS,
}


DEFAULT_TOLERANCE = 0.0
"""Default `exact_tolerance`: score every node. Pruning pays only for a model that puts most of
its mass on few canonical strings; for a calibrated model, which spreads it over the whole trie,
the rounds cost more than one full pass (BENCHMARKS.md §5)."""


@dataclass
class Config(ssot.SSOTOptions):
    """Settings of the structured-sampling benchmark (defaults: the paper's evaluation)."""

    split: str = option(
        "both", "held-out split: ood, unseen or both", choices=tuple(SPLIT_CHOICES), cache_key=False
    )
    selection: str = option(
        "paper_selected", "paper_selected or full_grid", choices=SELECTIONS, cache_key=False
    )
    per_family: int = option(
        0, "evaluate this many evenly spaced prompts per family (0: all)", min=0, cache_key=False
    )
    samples: int | None = option(
        None, "generations per prompt (default: 1000; 250 with --ssot)", min=1
    )
    max_new_tokens: int | None = option(
        None, "generation length limit in tokens (default: 32; 2048 with --ssot)", min=1
    )
    kl_paths: int = option(4, "target paths per prompt for the logit KL", min=1)
    exact: bool | None = option(
        None,
        "also compute the exact model distribution over canonical outputs (default: on; SSOT "
        "cannot have it)",
    )
    decimals: int = option(
        5,
        "decimals of the evaluation output space (paper: 5); an adapter trained at fewer decimals "
        "writes strings that are canonical only in a space of its own format",
        min=0,
        max=MAX_DECIMALS,
    )
    max_bins: int = option(16384, "bins of the evaluation output space", min=2, max=MAX_BINS_LIMIT)
    exact_chunk_size: int = option(
        DEFAULT_CHUNK_SIZE, "trie nodes per packed forward pass", min=1, cache_key=False
    )
    exact_tolerance: float = option(
        DEFAULT_TOLERANCE,
        "exact pass: stop expanding the trie, most probable prefixes first, once the mass left "
        "unexpanded (exact_unresolved_mass) is at most this times the valid mass found "
        "(0: score every node)",
        min=0,
    )

    def __post_init__(self) -> None:
        # The paper's SSOT runs: fewer generations, room for the random string and the reasoning.
        ssot.fill_mode_defaults(
            self,
            {"samples": 1000, "max_new_tokens": 32, "exact": True},
            {"samples": 250, "max_new_tokens": 2048, "exact": False},
        )

    def check(self) -> None:
        if self.ssot and self.exact:
            raise ValueError(
                "--ssot measures sampled answers only: the exact pass and the logit KL score the "
                "plain prompt's answer tokens (drop --exact)"
            )


# Summary figure -> (per-prompt field, statistic over family means).
AGGREGATES: dict[str, tuple[str, Statistic]] = {
    "valid_rate": ("valid_rate", statistics.fmean),
    "median_normalized_w1": ("normalized_w1", statistics.median),
    "mean_normalized_w1": ("normalized_w1", statistics.fmean),
    "logit_kl": ("logit_kl", statistics.fmean),
    "exact_valid_mass": ("exact_valid_mass", statistics.fmean),
    "exact_median_normalized_w1": ("exact_normalized_w1", statistics.median),
    # The true mean valid mass lies in [exact_valid_mass, exact_valid_mass + this].
    "exact_unresolved_mass": ("exact_unresolved_mass", statistics.fmean),
}
REPORT_FIELDS = (
    "checkpoint",
    "section",
    "group",
    "split",
    "family",
    "params",
    "valid_rate",
    "normalized_w1",
    *GOF_FIELDS,
    "logit_kl",
    "exact_valid_mass",
    "exact_normalized_w1",
    "exact_unresolved_mass",
    "ssot_degraded_rate",
)
TABLE_FIELDS = (
    ("valid rate", "valid_rate"),
    ("norm. W1", "normalized_w1"),
    ("logit KL", "logit_kl"),
    ("exact valid mass", "exact_valid_mass"),
    ("exact norm. W1", "exact_normalized_w1"),
    ("SSOT degraded extraction", "ssot_degraded_rate"),
)


SECTIONS = HELD_OUT_SPLITS
# The before/after columns (headline table, model card).
HEADLINE = (
    ("OOD valid rate", "test_ood_family.valid_rate"),
    ("OOD median norm. W1", "test_ood_family.median_normalized_w1"),
)


@dataclass(frozen=True)
class PromptJob:
    """A prompt with everything its exact figures need besides the model."""

    prompt_ids: list[int]
    space: Any
    trie: Any
    layout: TrieLayout


class PromptJobs:
    """The run's shared state: the output spaces and tries of every prompt of the run, built once
    for all checkpoints when the first prompt needs them (the tokenizer comes with the model)."""

    def __init__(self, config: Config, items: Sequence[Item[PromptSpec]]) -> None:
        self.config = config
        self.specs = [item.payload for item in items]
        self.jobs: dict[PromptSpec, PromptJob] | None = None

    def job(self, lm: LM, spec: PromptSpec) -> PromptJob:
        if self.jobs is None:
            spaces = build_output_spaces(
                self.specs, decimals=self.config.decimals, max_bins=self.config.max_bins
            )
            tries = build_tries(spaces, TrieTokenizer.from_hf(lm.chat.tokenizer, lm.chat))
            self.jobs = {
                s: PromptJob(lm.chat.prompt_ids(s.prompt), space, trie, TrieLayout.from_trie(trie))
                for s, space, trie in zip(self.specs, spaces, tries, strict=True)
            }
        return self.jobs[spec]


def items(config: Config) -> list[Item[PromptSpec]]:
    chosen = splits(config.selection)
    specs = [spec for name in SPLIT_CHOICES[config.split] for spec in chosen[name]]
    specs = evenly_spaced(specs, config.per_family, group=lambda s: (s.split, s.family))
    return [Item((s.split, s.family, s.param_items), s.family, s, section=s.split) for s in specs]


def setup(config: Config, items: Sequence[Item[PromptSpec]]) -> PromptJobs:
    return PromptJobs(config, items)


def check(checkpoint: Checkpoint, config: Config) -> None:
    """Warn when an adapter was trained at other decimals than the exact pass scores: its answers
    are then rarely canonical strings of the evaluation space, and its exact valid mass (~1e-7 for
    a 3-decimal adapter at 5) measures the format, not the calibration."""
    trained = checkpoint.train_config().get("decimals")
    if config.exact and isinstance(trained, int) and trained != config.decimals:
        warnings.warn(
            f"adapter {checkpoint.name!r} was trained to write {trained} decimals; the exact pass "
            f"scores {config.decimals}-decimal canonical strings, so its exact valid mass and "
            f"exact W1 count only answers written with {config.decimals} decimals "
            f"(--decimals {trained} scores its own format)",
            stacklevel=2,
        )


def run_item(
    lm: LM, item: Item[PromptSpec], config: Config, state: PromptJobs, seed: int
) -> dict[str, Any]:
    """All metrics of one prompt under one checkpoint."""
    spec = item.payload
    if config.ssot:
        return ssot_record(lm, spec, config, seed)
    job = state.job(lm, spec)
    prompt = lm.prefill(job.prompt_ids)
    kl = lm.trie_logit_kl(prompt, job.trie, job.layout, config.kl_paths, seed)
    samples, max_new_tokens = _sampling(config)
    completions = lm.sample(prompt, samples, seed=seed, max_new_tokens=max_new_tokens)
    texts = [lm.decode(ids) for ids in completions]
    record: dict[str, Any] = {
        **sample_metrics(spec, texts),
        "logit_kl": kl,
        "exact_valid_mass": None,
        "exact_w1": None,
        "exact_normalized_w1": None,
        "exact_sequence_kl": None,
        "exact_unresolved_mass": None,
        "exact_histogram": None,
        "examples": texts[:5],
    }
    if config.exact:
        result = exact_distribution(
            lm,
            prompt,
            job.space,
            job.layout,
            chunk_size=config.exact_chunk_size,
            tolerance=config.exact_tolerance,
        )
        record.update(
            exact_valid_mass=result.valid_mass,
            exact_w1=result.w1,
            exact_normalized_w1=result.normalized_w1,
            exact_sequence_kl=result.sequence_kl,
            exact_unresolved_mass=result.unresolved_mass,
            exact_histogram=histogram_of(job.space, result.probs),
        )
    return record


def summarize(records: Sequence[Mapping[str, Any]], state: PromptJobs) -> dict[str, Any]:
    """Per split: the AGGREGATES over family means, and the goodness-of-fit pass rate over
    prompts."""
    by_section = {
        s: [r for r in records if r["section"] == s]
        for s in dict.fromkeys(r["section"] for r in records)
    }
    return {
        section: {**group_aggregates(chosen, AGGREGATES), **pass_summary(chosen)}
        for section, chosen in by_section.items()
    }


def sample_metrics(spec: PromptSpec, answers: Sequence[str]) -> dict[str, Any]:
    """The prompt's identity and what its sampled answers give: valid rate, W1, goodness of fit
    (only the valid values enter), valid values."""
    parsed = parse_samples(answers, spec.family, spec.params)
    valid = parsed.valid_values
    return {
        "split": spec.split,
        "family": spec.family,
        "params": spec.params,
        "valid_rate": parsed.valid_rate,
        "w1": w1(valid, spec.family, spec.params),
        "normalized_w1": w1(valid, spec.family, spec.params, normalized=True),
        **goodness_of_fit(valid, spec.family, spec.params),
        "sample_values": valid.tolist(),
    }


def _sampling(config: Config) -> tuple[int, int]:
    """Generations per prompt and their token limit, which `Config.__post_init__` always sets."""
    assert config.samples is not None and config.max_new_tokens is not None
    return config.samples, config.max_new_tokens


def ssot_record(lm: LM, spec: PromptSpec, config: Config, seed: int) -> dict[str, Any]:
    """The sample metrics of one prompt under SSOT: the answers extracted from the tagged
    generations (decoded without special tokens) are parsed like direct answers."""
    prompt = lm.prefill(ssot.prompt_ids(lm.chat, spec.prompt, ssot.PIF))
    samples, max_new_tokens = _sampling(config)
    completions = lm.sample(prompt, samples, seed=seed, max_new_tokens=max_new_tokens)
    texts = [lm.decode(ids, special=False) for ids in completions]
    answers, degraded = ssot.extract_answers(texts, strict=config.ssot_strict, chat=lm.chat)
    return {
        **sample_metrics(spec, answers),
        "logit_kl": None,
        "ssot_degraded_rate": sum(degraded) / len(degraded),
        "examples": texts[:5],
        "answers": answers[:5],
    }


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """Per (split, family) overlays of target law, exact distribution and samples; W1 bars."""
    from calibft.eval.benchmarks.structured.figures import plot_family_w1, plot_overlays

    return plot_overlays(directory, records) + plot_family_w1(directory, result)
