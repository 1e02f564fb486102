"""Prompt splits (docs/method.md §3): parameter grids per family, turned into prompts.

Grids are built from each family's `Family.grids`: axes in `grid_axes` order, Cartesian product
(first axis slowest), subsampled to `max_specs` rows, each row mapped to prompt parameters by the
family's `law.grid`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from calibft.distributions import Family, Grid, GridRow, families, prompt_text, validate_params

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


def _grid_rows(grid: Grid) -> list[GridRow]:
    """Cartesian product of the grid's axes (first axis slowest), evenly subsampled to
    `max_specs` rows."""
    names = [name for name, _ in grid.axes]
    points = itertools.product(*(axis.points() for _, axis in grid.axes))
    rows = [dict(zip(names, point, strict=True)) for point in points]
    if len(rows) > grid.max_specs:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, grid.max_specs, dtype=int)]
    return rows


def _specs(family: Family, rows: Iterable[Mapping[str, float]], split: str) -> list[PromptSpec]:
    return [PromptSpec.from_params(family.id, family.law.grid(dict(row)), split) for row in rows]


def splits(selection: str = "full_grid") -> dict[str, list[PromptSpec]]:
    """Prompts of each split: keys "train", "test_unseen_params", "test_ood_family".

    "full_grid": every family's train / test_unseen / ood grid (docs/method.md §3 has the counts).
    "paper_selected": the same training grid, with the paper's evaluation configurations
    (`Family.selected`: `test_selected` of each training family, `ood_selected` of each held-out
    family in families.json).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    full = selection == "full_grid"
    out: dict[str, list[PromptSpec]] = {name: [] for name in SPLIT_NAMES}
    for family in families():
        if family.split_role == "train":
            out["train"] += _specs(family, _grid_rows(family.grids["train"]), "train")
            unseen = _grid_rows(family.grids["test_unseen"]) if full else family.selected
            out["test_unseen_params"] += _specs(family, unseen, "test_unseen_params")
        else:
            ood = _grid_rows(family.grids["ood"]) if full else family.selected
            out["test_ood_family"] += _specs(family, ood, "test_ood_family")
    return out
