"""The contract every benchmark follows (docs/adding-a-benchmark.md describes exactly this).

A benchmark is a module under `calibft.eval.benchmarks` named as it is registered. Required:

- ``NAME``, ``DESCRIPTION`` (one line for ``calibft eval --list``), ``Config`` (a dataclass of
  `calibft.config.option` fields), ``HEADLINE`` ((label, summary key) columns of the headline and
  before/after table; a dotted key reads a section, e.g. ``curated.mean_distinct``);
- ``items(config) -> list[Item]``: the work, read and checked before any model loads;
- ``run_item(lm, item, config, state, seed) -> dict``: one item's JSON-able record;
- ``summarize(records, state) -> dict``: one checkpoint's figures (`report.group_aggregates` is
  the helper for statistics over group means); with ``SECTIONS``, one dict per section present.

Optional (defaults in `Benchmark`): ``setup(config, items) -> state`` (what the run shares, built
once before any model loads; default None), ``check(checkpoint, config)`` (per checkpoint, before
any generation), ``run_batch(lm, items, config, state, seeds) -> list[dict]`` (the records of
several items, ``seeds[i]`` item i's seed, each equal to ``run_item``'s: the runner hands it up to
``batch_items`` pending items so that their requests reach the backend together),
``plots(directory, result, records) -> list[Path]``, ``SECTIONS``, ``REPORT_FIELDS``,
``TABLE_FIELDS``.

This module imports nothing heavy: ``calibft eval --list`` reads every benchmark's contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

P = TypeVar("P")

REQUIRED = ("NAME", "DESCRIPTION", "Config", "HEADLINE", "items", "run_item", "summarize")
OPTIONAL = (
    "setup",
    "check",
    "run_batch",
    "plots",
    "SECTIONS",
    "REPORT_FIELDS",
    "TABLE_FIELDS",
)


@dataclass(frozen=True)
class Shard:
    """A slice of an item's sample budget: samples ``start .. start + count - 1``."""

    start: int
    count: int


@dataclass(frozen=True)
class Item(Generic[P]):
    """One unit of a benchmark's work, run once per checkpoint and cached.

    ``key``: a stable JSON-able tuple naming the item (its cache entry and seed derive from it);
    ``group``: the aggregation unit; ``section``: the part of the report it belongs to (one of the
    benchmark's ``SECTIONS``); ``payload``: what ``run_item`` needs (its type never changes).

    ``samples`` and ``shard_size`` split one prompt's sample budget into cached shards: the runner
    runs the item once per shard of at most ``shard_size`` samples, with ``shard`` set and the
    key extended by the shard's (start, count), so an interrupted run loses at most one shard and
    a larger budget reuses the shards a smaller one made.
    """

    key: tuple[Any, ...]
    group: str
    payload: P = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    section: str | None = None
    samples: int | None = None
    shard_size: int | None = None
    shard: Shard | None = None

    def shards(self) -> list[Item[P]]:
        """The item as the runner runs it: itself, or one item per shard of its samples."""
        if self.samples is None:
            return [self]
        size = self.shard_size or self.samples
        return [
            dataclasses.replace(
                self,
                key=(*self.key, start, min(size, self.samples - start)),
                shard=Shard(start, min(size, self.samples - start)),
            )
            for start in range(0, self.samples, size)
        ]


def _none(*_: Any) -> None:
    return None


def _no_plots(*_: Any) -> list[Path]:
    return []


@dataclass(frozen=True)
class Benchmark:
    """A benchmark module seen through its contract, optional members filled with defaults."""

    NAME: str
    DESCRIPTION: str
    Config: type
    HEADLINE: tuple[tuple[str, str], ...]
    items: Callable[[Any], list[Item[Any]]]
    run_item: Callable[..., dict[str, Any]]
    summarize: Callable[[Sequence[Mapping[str, Any]], Any], dict[str, Any]]
    setup: Callable[[Any, Sequence[Item[Any]]], Any] = _none
    check: Callable[[Any, Any], None] = _none
    run_batch: Callable[..., list[dict[str, Any]]] | None = None
    plots: Callable[..., list[Path]] = _no_plots
    SECTIONS: tuple[str, ...] = ()
    REPORT_FIELDS: tuple[str, ...] = ()
    TABLE_FIELDS: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_module(cls, module: ModuleType, name: str) -> Benchmark:
        """The benchmark of `module`, registered as `name`; ValueError saying what is missing."""
        missing = [member for member in REQUIRED if not hasattr(module, member)]
        if missing:
            raise ValueError(f"benchmark {name!r} lacks {', '.join(missing)} (the contract)")
        if module.NAME != name or module.__name__.rsplit(".", 1)[-1] != name:
            raise ValueError(f"benchmark {name!r}: its NAME and module name must both be {name!r}")
        if not dataclasses.is_dataclass(module.Config):
            raise ValueError(f"benchmark {name!r}: Config must be a dataclass")
        members = {m: getattr(module, m) for m in (*REQUIRED, *OPTIONAL) if hasattr(module, m)}
        return cls(**members)

    def sections(self, summary: Mapping[str, Any]) -> list[str | None]:
        """The sections of one checkpoint's summary, in declared order; [None] when unsectioned."""
        if not self.SECTIONS:
            return [None]
        return [s for s in self.SECTIONS if s in summary]
