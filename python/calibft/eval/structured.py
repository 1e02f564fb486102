"""Structured sampling (docs/benchmarks/structured.md): does the model sample the requested law?

Per held-out prompt and checkpoint: the logit-level KL against the evaluation trie along sampled
target paths; N generations (temperature 1, top-p 1, pure ancestral sampling) parsed into the
valid rate and the (normalized) W1 of the valid values; optionally the exact model distribution
over the canonical outputs (tree-attention pass). With `ssot` on, the prompts go through String
Seed of Thought (docs/benchmarks/ssot.md): sample metrics only, from the extracted answers.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from calibft.config import option
from calibft.eval import ssot
from calibft.eval.answers import parse_samples
from calibft.eval.exact import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOLERANCE,
    TrieLayout,
    exact_distribution,
    histogram_of,
    prompt_logit_kl,
)
from calibft.eval.metrics import w1
from calibft.eval.plots import plot_family_w1, plot_overlays
from calibft.eval.report import format_value
from calibft.eval.runner import Item
from calibft.lm import LM, Checkpoint
from calibft.splits import HELD_OUT_SPLITS, SELECTIONS, PromptSpec, evenly_spaced, splits
from calibft.targets import TrieTokenizer, build_output_spaces, build_tries
from calibft.targets.numeric import MAX_BINS_LIMIT, MAX_DECIMALS

NAME = "structured"
DESCRIPTION = (
    "does the model sample the requested numeric law? valid rate, W1, logit KL, exact distribution"
)

SPLIT_CHOICES = {
    "ood": ("test_ood_family",),
    "unseen": ("test_unseen_params",),
    "both": HELD_OUT_SPLITS,
}


@dataclass
class Config:
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
        "unexpanded (exact_unresolved_mass) is at most this times the valid mass found (0: score every node)",
        min=0,
    )
    ssot: bool = option(
        False, "String Seed of Thought prompting (docs/benchmarks/ssot.md): sample metrics only"
    )
    ssot_strict: bool = option(
        True,
        "SSOT: only a closed <answer>...</answer> pair gives an answer (off: also degraded ones)",
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
AGGREGATES = {
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


@dataclass(frozen=True)
class PromptJob:
    """A prompt with everything its evaluation needs besides the model."""

    spec: PromptSpec
    prompt_ids: list[int]
    space: Any
    trie: Any


def items(config: Config) -> list[Item]:
    chosen = splits(config.selection)
    specs = [spec for name in SPLIT_CHOICES[config.split] for spec in chosen[name]]
    specs = evenly_spaced(specs, config.per_family, group=lambda s: (s.split, s.family))
    return [Item((s.split, s.family, s.param_items), s.family, s, section=s.split) for s in specs]


def check(checkpoint: Checkpoint, config: Config) -> None:
    """Warn when an adapter was trained at other decimals than the exact pass scores: its answers
    are then rarely canonical strings of the evaluation space, and its exact valid mass (~1e-7 for
    a 3-decimal adapter at 5) measures the format, not the calibration."""
    trained = checkpoint.train_config().get("decimals")
    if config.exact and isinstance(trained, int) and trained != config.decimals:
        warnings.warn(
            f"adapter {checkpoint.name!r} was trained to write {trained} decimals; the exact pass scores "
            f"{config.decimals}-decimal canonical strings, so its exact valid mass and exact W1 count only "
            f"answers written with {config.decimals} decimals (--decimals {trained} scores its own format)",
            stacklevel=2,
        )


def prepare(lm: LM, pending: Sequence[Item], config: Config) -> list[Item]:
    """Output spaces and tries of the pending prompts, built once for every checkpoint."""
    if config.ssot:  # sample metrics only: no output space or trie to build
        ids = [ssot.prompt_ids(lm.chat, item.payload.prompt, ssot.PIF) for item in pending]
        return [
            replace(item, payload=PromptJob(item.payload, i, None, None))
            for item, i in zip(pending, ids, strict=True)
        ]
    specs = [item.payload for item in pending]
    spaces = build_output_spaces(specs, decimals=config.decimals, max_bins=config.max_bins)
    tries = build_tries(spaces, TrieTokenizer.from_hf(lm.tokenizer, lm.chat))
    return [
        replace(
            item,
            payload=PromptJob(item.payload, lm.chat.prompt_ids(item.payload.prompt), space, trie),
        )
        for item, space, trie in zip(pending, spaces, tries, strict=True)
    ]


def run_item(lm: LM, item: Item, config: Config, seed: int) -> dict[str, Any]:
    """All metrics of one prompt under one checkpoint."""
    job: PromptJob = item.payload
    spec = job.spec
    if config.ssot:
        return ssot_record(lm, job, config, seed)
    layout = TrieLayout.from_trie(job.trie)
    state = lm.prefill(job.prompt_ids)
    kl = prompt_logit_kl(lm.model, state, job.trie, layout, config.kl_paths, seed)
    completions = lm.sample(state, config.samples, seed=seed, max_new_tokens=config.max_new_tokens)
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
            lm.model,
            state,
            job.space,
            layout,
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


def sample_metrics(spec: PromptSpec, answers: Sequence[str]) -> dict[str, Any]:
    """The prompt's identity and what its sampled answers give: valid rate, W1, valid values."""
    parsed = parse_samples(answers, spec.family, spec.params)
    valid = parsed.valid_values
    return {
        "split": spec.split,
        "family": spec.family,
        "params": spec.params,
        "valid_rate": parsed.valid_rate,
        "w1": w1(valid, spec.family, spec.params),
        "normalized_w1": w1(valid, spec.family, spec.params, normalized=True),
        "sample_values": valid.tolist(),
    }


def ssot_record(lm: LM, job: PromptJob, config: Config, seed: int) -> dict[str, Any]:
    """The sample metrics of one prompt under SSOT: the answers extracted from the tagged
    generations (decoded without special tokens) are parsed like direct answers."""
    spec = job.spec
    state = lm.prefill(job.prompt_ids)
    completions = lm.sample(state, config.samples, seed=seed, max_new_tokens=config.max_new_tokens)
    texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    answers, degraded = ssot.extract_answers(
        texts, strict=config.ssot_strict, gpt_oss=ssot.is_gpt_oss(lm.chat)
    )
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
    return plot_overlays(directory, records) + plot_family_w1(directory, result)


def comparison_table(report: Mapping[str, Any], split: str = "test_ood_family") -> str:
    """A per-prompt before/after table of valid rate and normalized W1, plus the split's summary."""
    result = report["benchmarks"][NAME]
    rows: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for record in result["items"]:
        if record["split"] == split:
            key = (record["family"], ",".join(f"{k}={v:g}" for k, v in record["params"].items()))
            rows.setdefault(key, {})[record["checkpoint"]] = record
    names = list(result["checkpoints"])
    header = f"{'held-out prompt':<44}" + "".join(
        f"{name[:14] + ' valid':>22}{'W1':>10}" for name in names
    )
    lines = [header, "-" * len(header)]
    for (family, shown), by_name in rows.items():
        line = f"{family + ' ' + shown:<44.44}"
        for name in names:
            record = by_name.get(name, {})
            line += f"{format_value(record.get('valid_rate')):>22}{format_value(record.get('normalized_w1')):>10}"
        lines.append(line)
    lines.append("-" * len(header))
    summary = f"{'all: mean valid, median W1':<44}"
    for name in names:
        figures = result["checkpoints"][name][split]
        summary += f"{format_value(figures['valid_rate']):>22}{format_value(figures['median_normalized_w1']):>10}"
    lines.append(summary)
    lines.append(
        "(valid: share of generations that parse as a number in the support; W1: Q95-Q05-normalized)"
    )
    return "\n".join(lines)
