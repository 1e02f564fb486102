"""Evaluation reports: aggregation (SPEC section 8), report.json and report.md.

Aggregation per split: each family's value is the mean over its prompts with a finite value; the
split's figure is the median (or mean) over families, and is undefined (null) if some family has
no finite value at all. Normalized W1 is reported as the median (the paper's headline) and mean
over families; valid rate, logit KL and exact valid mass as the mean over families.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from calibft.files import atomic_write_text

SPLITS = ("test_ood_family", "test_unseen_params")
PROMPT_FIELDS = (
    "checkpoint",
    "split",
    "family",
    "params",
    "valid_rate",
    "normalized_w1",
    "logit_kl",
    "exact_valid_mass",
    "exact_normalized_w1",
    "exact_unresolved_mass",
)
# Split-level figure -> (per-prompt field, across-family statistic).
AGGREGATES: dict[str, tuple[str, Callable[[Sequence[float]], float]]] = {
    "valid_rate": ("valid_rate", statistics.fmean),
    "median_normalized_w1": ("normalized_w1", statistics.median),
    "mean_normalized_w1": ("normalized_w1", statistics.fmean),
    "logit_kl": ("logit_kl", statistics.fmean),
    "exact_valid_mass": ("exact_valid_mass", statistics.fmean),
    "exact_median_normalized_w1": ("exact_normalized_w1", statistics.median),
    # The true mean valid mass lies in [exact_valid_mass, exact_valid_mass + this].
    "exact_unresolved_mass": ("exact_unresolved_mass", statistics.fmean),
}
_VERSIONED = ("calibft", "torch", "transformers", "peft", "numpy", "scipy", "tokenizers", "vllm")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def family_means(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, float | None]:
    """Per family, the mean of `key` over its prompts with a finite value (None if none has)."""
    values: dict[str, list[float]] = {}
    for record in records:
        values.setdefault(record["family"], [])
        if _finite(record.get(key)):
            values[record["family"]].append(float(record[key]))
    return {family: statistics.fmean(v) if v else None for family, v in values.items()}


def aggregate(
    records: Iterable[Mapping[str, Any]], key: str, statistic: Callable[[Sequence[float]], float]
) -> float | None:
    """`statistic` over families of the family means; None if there are no records or if some
    family has no finite value."""
    means = list(family_means(records, key).values())
    if not means or any(m is None for m in means):
        return None
    return float(statistic([m for m in means if m is not None]))


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_report(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report.json document from per-(checkpoint, prompt) records."""
    checkpoints: dict[str, Any] = {}
    for name in dict.fromkeys(r["checkpoint"] for r in records):
        splits = {}
        for split in SPLITS:
            chosen = [r for r in records if r["checkpoint"] == name and r["split"] == split]
            if chosen:
                splits[split] = {
                    figure: aggregate(chosen, key, statistic)
                    for figure, (key, statistic) in AGGREGATES.items()
                }
        checkpoints[name] = {"splits": splits}
    return {
        "checkpoints": checkpoints,
        "prompts": [{k: r.get(k) for k in PROMPT_FIELDS} for r in records],
        "config": dict(config),
        "versions": package_versions(),
    }


def _cell(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


_MD_COLUMNS = (
    ("valid rate", "valid_rate"),
    ("norm. W1", "normalized_w1"),
    ("logit KL", "logit_kl"),
    ("exact valid mass", "exact_valid_mass"),
    ("exact norm. W1", "exact_normalized_w1"),
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: every checkpoint side by side, per split (aggregates) and per family."""
    names = list(report["checkpoints"])
    lines = ["# calibft evaluation", ""]
    config = report["config"]
    lines += [
        f"Model `{config.get('model')}`, selection `{config.get('selection')}`, "
        f"{config.get('samples')} samples per prompt, seed {config.get('seed')}, "
        f"exact distribution {'on' if config.get('exact') else 'off'}. "
        "Family figures are means over the family's prompts; split figures aggregate families "
        "(W1: median and mean; others: mean); – means undefined.",
        "",
    ]
    header = "| " + " | ".join(names) + " |"
    rule = "|---" * (len(names) + 1) + "|"
    for split in SPLITS:
        present = [n for n in names if split in report["checkpoints"][n]["splits"]]
        if not present:
            continue
        lines += [f"## {split}", "", "| metric " + header, rule]
        for figure in AGGREGATES:
            values = [report["checkpoints"][n]["splits"].get(split, {}).get(figure) for n in names]
            if all(v is None for v in values):  # e.g. exact figures of a run without --exact
                continue
            lines.append(f"| {figure} | " + " | ".join(_cell(v) for v in values) + " |")
        lines.append("")
        prompts = [p for p in report["prompts"] if p["split"] == split]
        for title, key in _MD_COLUMNS:
            per_checkpoint = {
                n: family_means([p for p in prompts if p["checkpoint"] == n], key) for n in names
            }
            if all(v is None for means in per_checkpoint.values() for v in means.values()):
                continue
            families = list(dict.fromkeys(p["family"] for p in prompts))
            lines += [f"### {title} by family", "", "| family " + header, rule]
            for family in families:
                row = [_cell(per_checkpoint[n].get(family)) for n in names]
                lines.append(f"| {family} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def write_outputs(
    output: Path,
    config: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    plots: bool = True,
) -> dict[str, Any]:
    """Write report.json, report.md and (optionally) the PNG plots; return the report."""
    report = build_report(config, records)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(output / "report.md", render_markdown(report))
    if plots:
        from calibft.plots import write_plots

        write_plots(output / "plots", report, records)
    return report
