"""Reports of an evaluation run, for any benchmark: report.json, report.md, the headline table,
and the aggregation helper benchmarks call.

`group_aggregates`: each group's value (a family, a task, a slice) is the mean of a record field
over the group's items with a finite value; a figure is a statistic (median, mean) over groups,
and is undefined (null) when some group has no finite value at all. A benchmark that declares
``SECTIONS`` summarizes each section on its own (structured: the split).
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

from calibft.eval.contract import Benchmark
from calibft.eval.figures import pareto_figure, save_figure
from calibft.files import atomic_write_text

_VERSIONED = ("calibft", "torch", "transformers", "peft", "numpy", "scipy", "tokenizers", "vllm")

Statistic = Callable[[Sequence[float]], float]


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_or_none(value: Any) -> Any:
    """Strict JSON has no NaN or infinity: undefined (or infinite) metrics are stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def safe_filename(text: str, limit: int = 40) -> str:
    """`text` as a file-name part: characters other than letters, digits, - and _ become _."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:limit]


def format_value(value: Any, digits: int = 3) -> str:
    """A metric for tables: `digits` significant digits, or n/a when undefined."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def group_means(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, float | None]:
    """Per group, the mean of `key` over its records with a finite value (None if none has)."""
    values: dict[str, list[float]] = {}
    for record in records:
        values.setdefault(record["group"], [])
        if is_finite(record.get(key)):
            values[record["group"]].append(float(record[key]))
    return {group: statistics.fmean(v) if v else None for group, v in values.items()}


def aggregate(records: Iterable[Mapping[str, Any]], key: str, statistic: Statistic) -> float | None:
    """`statistic` over the group means; None if there are no records or some group has no
    finite value."""
    means = list(group_means(records, key).values())
    if not means or any(m is None for m in means):
        return None
    return float(statistic([m for m in means if m is not None]))


def group_aggregates(
    records: Sequence[Mapping[str, Any]], aggregates: Mapping[str, tuple[str, Statistic]]
) -> dict[str, float | None]:
    """Summary figures from ``{figure: (record field, statistic over group means)}``."""
    return {name: aggregate(records, key, stat) for name, (key, stat) in aggregates.items()}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


Results = Mapping[str, tuple[Benchmark, Sequence[Mapping[str, Any]], Any]]
"""Per benchmark name: the benchmark, its records and its run state."""


def build_report(config: Mapping[str, Any], results: Results) -> dict[str, Any]:
    """The report.json document: per benchmark, its declared sections, each checkpoint's summary
    and the item records (restricted to the benchmark's REPORT_FIELDS when it names them)."""
    benchmarks: dict[str, Any] = {}
    for name, (module, records, state) in results.items():
        checkpoints = {
            c: dict(module.summarize([r for r in records if r["checkpoint"] == c], state))
            for c in dict.fromkeys(r["checkpoint"] for r in records)
        }
        fields = module.REPORT_FIELDS
        items = [
            {
                k: finite_or_none(v)
                for k, v in (((k, r.get(k)) for k in fields) if fields else r.items())
            }
            for r in records
        ]
        benchmarks[name] = {
            "sections": list(module.SECTIONS),
            "checkpoints": checkpoints,
            "items": items,
        }
    return {"benchmarks": benchmarks, "config": dict(config), "versions": package_versions()}


def _figure_rows(summaries: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    lines = []
    for figure in dict.fromkeys(f for s in summaries.values() for f in s):
        values = [summaries[n].get(figure) for n in names]
        if all(v is None or isinstance(v, (dict, list)) for v in values):
            continue  # undefined everywhere (e.g. exact figures of a run without the exact pass)
        lines.append(f"| {figure} | " + " | ".join(format_value(v, 4) for v in values) + " |")
    return lines


def _sections(result: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str | None]:
    """The sections of a summary, in declared order; [None] for an unsectioned benchmark."""
    declared = result.get("sections") or []
    return [s for s in declared if s in summary] if declared else [None]


def render_markdown(report: Mapping[str, Any], modules: Mapping[str, Benchmark]) -> str:
    """report.md: per benchmark (and section), every checkpoint side by side; then per-group
    tables of the fields the module lists in TABLE_FIELDS."""
    config = report["config"]
    lines = [
        "# calibft evaluation",
        "",
        f"Model `{config.get('model')}`, seed {config.get('seed')}. Group figures are means over "
        "the group's items; summary figures aggregate groups (see each benchmark's docs); – or "
        "n/a means undefined.",
        "",
    ]
    table = headline_table(report, modules)
    if table:
        lines += ["## Headline figures", "", table, ""]
    for name, result in report["benchmarks"].items():
        module = modules[name]
        names = list(result["checkpoints"])
        header = "| " + " | ".join(names) + " |"
        rule = "|---" * (len(names) + 1) + "|"
        lines += [f"## {name}", ""]
        summaries = result["checkpoints"]
        first: Mapping[str, Any] = next(iter(summaries.values()), {})
        for section in _sections(result, first):
            chosen = {
                n: (summaries[n] if section is None else summaries[n].get(section, {}))
                for n in names
            }
            if section is not None:
                lines += [f"### {section}", ""]
            lines += ["| figure " + header, rule, *_figure_rows(chosen, names), ""]
            items = [i for i in result["items"] if section is None or i.get("section") == section]
            for title, key in module.TABLE_FIELDS:
                per = {
                    n: group_means([i for i in items if i["checkpoint"] == n], key) for n in names
                }
                if all(v is None for means in per.values() for v in means.values()):
                    continue
                groups = list(dict.fromkeys(i["group"] for i in items))
                lines += [f"#### {title} by group", "", "| group " + header, rule]
                lines += [
                    f"| {g} | " + " | ".join(format_value(per[n].get(g), 4) for n in names) + " |"
                    for g in groups
                ]
                lines.append("")
    return "\n".join(lines)


def summary_figure(report: Mapping[str, Any], benchmark: str, checkpoint: str, key: str) -> Any:
    """One figure of a checkpoint's summary by its ``HEADLINE``-style key (a dotted key reads a
    section); None when absent."""
    value: Any = report["benchmarks"][benchmark]["checkpoints"].get(checkpoint, {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def headline_table(report: Mapping[str, Any], modules: Mapping[str, Benchmark]) -> str:
    """The paper's Tables 1 and 2 view, also the model card's before/after table: one row per
    checkpoint, one column per figure a benchmark names in its ``HEADLINE`` ((label, summary key)
    pairs; a dotted key reads a section, e.g. ``curated.mean_distinct``). "" when none has any."""
    columns = [
        (f"{name}: {label}", name, key)
        for name in report["benchmarks"]
        for label, key in modules[name].HEADLINE
    ]
    if not columns:
        return ""
    results = report["benchmarks"].values()
    checkpoints = list(dict.fromkeys(c for result in results for c in result["checkpoints"]))

    lines = [
        "| checkpoint | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for checkpoint in checkpoints:
        cells = [
            format_value(summary_figure(report, name, checkpoint, key), 4)
            for _, name, key in columns
        ]
        lines.append(f"| {checkpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per benchmark, checkpoint (and section) with its figures, for the terminal."""
    lines = []
    for name, result in report["benchmarks"].items():
        for checkpoint, summary in result["checkpoints"].items():
            parts = [
                ("", summary) if s is None else (s, summary[s]) for s in _sections(result, summary)
            ]
            for section, figures in parts:
                shown = ", ".join(
                    f"{k}={format_value(v, 4)}"
                    for k, v in figures.items()
                    if not isinstance(v, (dict, list))
                )
                lines.append(f"{name:<12} {checkpoint:>16} {section:<20} {shown}")
    return lines


# The figures of a calibration-vs-retention plot: per benchmark, candidates (summary key, label,
# higher is better) in order of preference; the first defined for every checkpoint is drawn.
RETENTION_FIGURES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "paloma": (("bits_per_byte", "bits per byte (paloma)", False),),
    "retention": (
        ("gsm8k_strict_accuracy", "GSM8K strict accuracy (retention)", True),
        ("mean_accuracy", "mean accuracy (retention)", True),
    ),
}
CALIBRATION_FIGURES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "structured": (
        ("test_ood_family.logit_kl", "OOD logit KL (structured)", False),
        ("test_unseen_params.logit_kl", "unseen-params logit KL (structured)", False),
        ("test_ood_family.valid_rate", "OOD valid rate (structured)", True),
        ("test_unseen_params.valid_rate", "unseen-params valid rate (structured)", True),
    ),
    "categorical": (
        ("mean_exact_tv", "mean exact TV (categorical)", False),
        ("mean_exact_valid_mass", "mean exact valid mass (categorical)", True),
    ),
    "open_random": (
        ("mean_support_90", "mean support size (open_random)", True),
        ("mean_unique_fraction", "mean unique rate (open_random)", True),
    ),
}


def _trade_off_axes(
    report: Mapping[str, Any], table: Mapping[str, tuple[tuple[str, str, bool], ...]]
) -> list[tuple[str, str, bool, dict[str, float]]]:
    """Per benchmark of the run in `table`: its first candidate figure defined for every
    checkpoint, as (benchmark, label, higher is better, checkpoint -> value)."""
    axes = []
    for name, candidates in table.items():
        checkpoints = list(report["benchmarks"].get(name, {}).get("checkpoints", {}))
        for key, label, higher in candidates:
            values = {c: summary_figure(report, name, c, key) for c in checkpoints}
            if values and all(is_finite(v) for v in values.values()):
                axes.append((name, label, higher, values))
                break
    return axes


def trade_off_plots(directory: Path, report: Mapping[str, Any]) -> list[Path]:
    """plots/pareto_<retention>_<calibration>.png for each pair of a retention benchmark (x) and
    a calibration benchmark (y) of the run: one point per checkpoint (an adapter-scale sweep's
    scales among them), the Pareto front highlighted."""
    paths = []
    for x_name, x_label, higher_x, xs in _trade_off_axes(report, RETENTION_FIGURES):
        for y_name, y_label, higher_y, ys in _trade_off_axes(report, CALIBRATION_FIGURES):
            names = [c for c in xs if c in ys]
            if not names:
                continue
            fig = pareto_figure(
                names,
                [(xs[c], ys[c]) for c in names],
                x_label=x_label,
                y_label=y_label,
                higher_x=higher_x,
                higher_y=higher_y,
            )
            paths.append(directory / f"pareto_{x_name}_{y_name}.png")
            save_figure(fig, paths[-1])
    return paths


def write_outputs(
    output: Path, config: Mapping[str, Any], results: Results, *, plots: bool = True
) -> dict[str, Any]:
    """Write report.json, report.md and (optionally) each benchmark's plots and the
    calibration-vs-retention plots (`trade_off_plots`); return the report."""
    report = build_report(config, results)
    atomic_write_text(output / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    modules = {name: module for name, (module, _, _) in results.items()}
    atomic_write_text(output / "report.md", render_markdown(report, modules))
    if plots:
        for name, (module, records, _) in results.items():
            module.plots(output / "plots", report["benchmarks"][name], records)
        trade_off_plots(output / "plots", report)
    return report
