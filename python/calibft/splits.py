"""Prompt splits (docs/method.md §3): parameter grids per family, turned into prompts.

Grids are built from each family's configuration in `families.json`: axes in `grid_axes` order,
Cartesian product (first axis slowest), each row mapped to prompt parameters, then subsampled
to `max_specs` rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

from calibft.distributions import load_spec, prompt_text, validate_params

__all__ = ["HELD_OUT_SPLITS", "SELECTIONS", "SPLIT_NAMES", "PromptSpec", "evenly_spaced", "splits"]

SPLIT_NAMES = ("train", "test_unseen_params", "test_ood_family")
HELD_OUT_SPLITS = ("test_ood_family", "test_unseen_params")
"""The evaluation splits, in report order."""
SELECTIONS = ("full_grid", "paper_selected")


@dataclass(frozen=True, init=False)
class PromptSpec:
    """One prompt: a family, its parameters (prompt order), the rendered prompt and its split.

    Parameters are stored as a tuple of items so specs are hashable; `params` returns a fresh dict.
    """

    family: str
    param_items: tuple[tuple[str, float], ...]
    prompt: str
    split: str

    def __init__(self, family: str, params: Mapping[str, float], prompt: str, split: str) -> None:
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "param_items", tuple((k, float(v)) for k, v in params.items()))
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "split", split)

    @property
    def params(self) -> dict[str, float]:
        return dict(self.param_items)

    @classmethod
    def from_params(cls, family: str, params: Mapping[str, float], split: str) -> PromptSpec:
        """A validated spec whose prompt is rendered from the parameters."""
        checked = validate_params(family, params)
        return cls(family, checked, prompt_text(family, checked), split)


T = TypeVar("T")


def evenly_spaced(
    items: Sequence[T], count: int, group: Callable[[T], Hashable] | None = None
) -> list[T]:
    """At most `count` items of each group (all items are one group when `group` is None), evenly
    spaced over the group in its order: positions round(linspace(0, n - 1, count)), so the first
    and last are kept; a single pick is the middle one (index n // 2). `count` 0 keeps everything.

    Groups come out in order of first appearance, each group's items contiguous."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(group(item) if group else None, []).append(item)
    kept: list[T] = []
    for members in groups.values():
        if 0 < count < len(members):
            if count == 1:
                picks = [len(members) // 2]
            else:  # np.round: half to even, as the grids themselves round
                picks = np.round(np.linspace(0, len(members) - 1, count)).astype(int).tolist()
            members = [members[i] for i in picks]
        kept.extend(members)
    return kept


GridRow = dict[str, float]


def _rounded(*names: str) -> Callable[[GridRow], GridRow]:
    # Python's round is half-to-even, as docs/method.md §3 states for every grid rounding.
    return lambda row: {**row, **{name: float(round(row[name])) for name in names}}


def _hypergeometric(row: GridRow) -> GridRow:
    population = round(row["M"])
    successes = min(population, max(0, round(population * row["success_fraction"])))
    draws = min(round(row["N"]), population)
    return {"M": float(population), "K": float(successes), "N": float(draws)}


# Families whose grid coordinates are not their prompt parameters as they stand; the rest are
# the identity. Mirrors `grid_transform` in families.json.
_GRID_TRANSFORMS: Mapping[str, Callable[[GridRow], GridRow]] = MappingProxyType(
    {
        "uniform": lambda g: {"a": g["a"], "b": g["a"] + g["width"]},
        "triangular": lambda g: {
            "a": g["a"],
            "c": g["a"] + g["width"] * g["mode_fraction"],
            "b": g["a"] + g["width"],
        },
        "hypergeometric": _hypergeometric,
        "binomial": _rounded("n"),
        "negative_binomial": _rounded("r"),
        "beta_binomial": _rounded("n"),
    }
)


def _axis_values(
    axis: Mapping[str, Any], num_axes: int, defaults: Mapping[str, Any]
) -> list[float]:
    if "values" in axis:
        return [float(v) for v in axis["values"]]
    default_points = (
        defaults["linspace_points_1d"] if num_axes == 1 else defaults["linspace_points_2d_per_axis"]
    )
    num = axis.get("num_points", default_points)
    spacing = axis.get("spacing", "linspace")
    if spacing == "linspace":
        points = np.linspace(axis["min"], axis["max"], num)
    elif spacing == "logspace":
        points = np.geomspace(axis["min"], axis["max"], num)
    else:
        raise ValueError(f"axis spacing must be 'linspace' or 'logspace', got {spacing!r}")
    return [float(v) for v in points]


# grid_defaults key holding the max_specs fallback of each grid kind.
_MAX_SPECS_DEFAULTS = MappingProxyType(
    {
        "train": "train_max_specs_per_family",
        "test_unseen": "test_unseen_max_specs_per_family",
        "ood": "ood_max_specs_per_family",
    }
)


def _grid_rows(entry: Mapping[str, Any], kind: str) -> list[GridRow]:
    """One family's `kind` grid: Cartesian product of its axes (first axis slowest), evenly
    subsampled to max_specs rows."""
    defaults = load_spec()["grid_defaults"]
    config = entry[kind]
    grid_axes = entry["grid_axes"]
    axes = [_axis_values(config[name], len(grid_axes), defaults) for name in grid_axes]
    rows = [dict(zip(grid_axes, point, strict=True)) for point in itertools.product(*axes)]
    limit = config.get("max_specs", defaults[_MAX_SPECS_DEFAULTS[kind]])
    if len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit, dtype=int)]
    return rows


def _specs(family: str, grid: Iterable[Mapping[str, float]], split: str) -> list[PromptSpec]:
    transform = _GRID_TRANSFORMS.get(family, dict)
    return [PromptSpec.from_params(family, transform(dict(row)), split) for row in grid]


def splits(selection: str = "full_grid") -> dict[str, list[PromptSpec]]:
    """Prompts of each split: keys "train", "test_unseen_params", "test_ood_family".

    "full_grid": every family's train / test_unseen / ood grid (1988 / 591 / 92 prompts).
    "paper_selected": the same training grid, with the paper's evaluation configurations
    (`test_selected`, one per training family; `ood_selected`, three per held-out family).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    full = selection == "full_grid"
    out: dict[str, list[PromptSpec]] = {name: [] for name in SPLIT_NAMES}
    for entry in load_spec()["families"]:
        family = entry["id"]
        if entry["split_role"] == "train":
            out["train"] += _specs(family, _grid_rows(entry, "train"), "train")
            unseen = _grid_rows(entry, "test_unseen") if full else entry["test_selected"]
            out["test_unseen_params"] += _specs(family, unseen, "test_unseen_params")
        else:
            ood = _grid_rows(entry, "ood") if full else entry["ood_selected"]
            out["test_ood_family"] += _specs(family, ood, "test_ood_family")
    return out
