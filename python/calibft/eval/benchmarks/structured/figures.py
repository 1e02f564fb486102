"""The structured benchmark's PNG plots: target law vs model distribution per prompt, W1 per family.

- ``overlay_<split>_<family>.png``: for up to three prompts of the family, the SciPy law (density or
  PMF), and for every checkpoint its exact distribution over the canonical outputs (renormalized;
  the legend gives its mass) and the histogram of its valid samples (like the paper's figure).
- ``w1_<split>.png``: per family, the family-mean normalized W1 of every checkpoint on a log axis
  (sampled: solid bars; exact: hatched bars; undefined values marked n/a).

Matplotlib runs on the Agg backend (no display needed) and is imported only when plotting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibft.distributions import frozen_law, get_family, law_ppf
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.report import group_means
from calibft.splits import HELD_OUT_SPLITS, evenly_spaced

MAX_PROMPTS_PER_FIGURE = 3


def _plot_prompt(
    ax: Any, family: str, params: Mapping[str, float], records: Sequence[Mapping[str, Any]]
) -> None:
    law = frozen_law(family, params)
    integer = get_family(family).integer_only
    lo, hi = float(law_ppf(law, 0.001)), float(law_ppf(law, 0.999))
    for record in records:
        hist = record.get("exact_histogram")
        if hist:
            lo, hi = min(lo, hist["edges"][0]), max(hi, hist["edges"][-1])
    if integer:
        xs = np.arange(np.floor(lo), np.ceil(hi) + 1)
        ax.plot(xs, law.pmf(xs), "k.-", lw=1.5, label="target law", zorder=5)
    else:
        xs = np.linspace(lo, hi, 400)
        ax.plot(xs, law.pdf(xs), "k-", lw=1.5, label="target law", zorder=5)
    colors = iter(
        ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"] * 10
    )
    for record in records:
        color = next(colors)
        edges = None
        hist = record.get("exact_histogram")
        if hist:
            edges = np.asarray(hist["edges"])
            widths = np.diff(edges) if not integer else np.ones(len(edges) - 1)
            mass = np.asarray(hist["mass"])
            total = mass.sum()
            if total > 0:
                # Conditional on a canonical answer (what the exact W1 compares): the shape stays
                # visible however little mass the model puts on canonical outputs.
                ax.stairs(
                    mass / total / widths,
                    edges,
                    color=color,
                    lw=1.5,
                    label=f"{record['checkpoint']} exact (valid mass {total:.2g})",
                )
        values = np.asarray(record.get("sample_values") or [], dtype=np.float64)
        values = values[(values >= lo) & (values <= hi)]
        if values.size:
            bins = (
                edges
                if edges is not None
                else (np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1) if integer else 40)
            )
            ax.hist(
                values,
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.25,
                color=color,
                label=f"{record['checkpoint']} samples",
            )
    shown = ", ".join(f"{k}={v:g}" for k, v in params.items())
    ax.set_title(f"{family} ({shown})", fontsize=9)
    ax.set_ylabel("probability" if integer else "density")


def plot_overlays(directory: Path, records: Sequence[Mapping[str, Any]]) -> list[Path]:
    """One overlay figure per (split, family); returns the written paths."""
    written = []
    for split in HELD_OUT_SPLITS:
        chosen = [r for r in records if r["split"] == split]
        for family in dict.fromkeys(r["family"] for r in chosen):
            prompts: dict[str, list[Mapping[str, Any]]] = {}
            for r in chosen:
                if r["family"] == family:
                    prompts.setdefault(repr(sorted(r["params"].items())), []).append(r)
            picks = evenly_spaced(list(prompts), MAX_PROMPTS_PER_FIGURE)
            fig = new_figure(figsize=(4.2 * len(picks), 3.2))
            axes = fig.subplots(1, len(picks), squeeze=False)[0]
            for ax, key in zip(axes, picks, strict=True):
                group = prompts[key]
                _plot_prompt(ax, family, group[0]["params"], group)
            axes[0].legend(fontsize=7)
            path = directory / f"overlay_{split}_{family}.png"
            save_figure(fig, path)
            written.append(path)
    return written


def plot_family_w1(directory: Path, result: Mapping[str, Any]) -> list[Path]:
    """Per split, a grouped bar chart of family-mean normalized W1 per checkpoint, on a log axis
    (base models reach 1e12 where calibrated ones sit near 0.1); undefined values read n/a."""
    written = []
    names = list(result["checkpoints"])
    for split in HELD_OUT_SPLITS:
        prompts = [p for p in result["items"] if p["split"] == split]
        if not prompts:
            continue
        families = list(dict.fromkeys(p["family"] for p in prompts))
        x = np.arange(len(families))
        width = 0.8 / max(1, len(names))
        fig = new_figure(figsize=(max(5.0, 0.6 * len(families) * max(1, len(names))), 3.6))
        ax = fig.subplots()
        ax.set_yscale("log")
        for i, name in enumerate(names):
            mine = [p for p in prompts if p["checkpoint"] == name]
            offset = -0.4 + i * width
            color = f"C{i}"
            for half, (key, style) in enumerate(
                (
                    ("normalized_w1", {"color": color}),
                    ("exact_normalized_w1", {"color": "white", "edgecolor": color, "hatch": "//"}),
                )
            ):
                means = group_means(mine, key)
                if half == 1 and all(v is None for v in means.values()):
                    continue  # a run without the exact pass
                values = [means.get(f) for f in families]
                left = x + offset + half * width * 0.5
                defined = [v is not None and v > 0 for v in values]
                ax.bar(
                    left[defined],
                    [v for v, ok in zip(values, defined, strict=True) if ok],
                    width * 0.5,
                    label=f"{name} ({'exact' if half else 'samples'})",
                    align="edge",
                    **style,
                )
                for j, ok in enumerate(defined):
                    if not ok:  # no valid sample (or no canonical mass): W1 undefined, not zero
                        ax.text(
                            left[j] + width * 0.25,
                            0.02,
                            "n/a",
                            rotation=90,
                            fontsize=6,
                            ha="center",
                            va="bottom",
                            color=color,
                            transform=ax.get_xaxis_transform(),
                        )
        ax.set_xticks(x, families, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("normalized W1 (family mean, log scale)")
        ax.set_title(split)
        ax.legend(fontsize=7)
        path = directory / f"w1_{split}.png"
        save_figure(fig, path)
        written.append(path)
    return written
