"""The five tinyBenchmarks datasets: where they come from and what a row must hold
(docs/benchmarks/retention.md §1).

Rows come from the Hugging Face hub (the optional `datasets` package) or from a local directory
with one JSON-lines file per dataset, ``<DIR>/<name>.jsonl`` (e.g. ``tinyMMLU.jsonl``), one row
object per line in dataset order. Every dataset has exactly 100 rows with a fixed set of fields;
anything else is refused in one line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROWS = 100

# A row check returns what is wrong with a row, or None when the row is usable.
RowCheck = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class TinyDataset:
    """One tinyBenchmarks dataset on the hub and the exact fields of its rows."""

    name: str  # also the local file's stem
    config: str | None
    split: str
    fields: frozenset[str]

    @property
    def hub_id(self) -> str:
        return f"tinyBenchmarks/{self.name}"


DATASETS = {
    d.name: d
    for d in (
        TinyDataset(
            "tinyMMLU",
            "all",
            "test",
            frozenset({"answer", "choices", "input_formatted", "question", "subject"}),
        ),
        TinyDataset(
            "tinyHellaswag",
            None,
            "validation",
            frozenset(
                {
                    "activity_label",
                    "ctx",
                    "ctx_a",
                    "ctx_b",
                    "endings",
                    "ind",
                    "input_formatted",
                    "label",
                    "source_id",
                    "split",
                    "split_type",
                }
            ),
        ),
        TinyDataset(
            "tinyTruthfulQA",
            "multiple_choice",
            "validation",
            frozenset({"input_formatted", "mc1_targets", "mc2_targets", "question"}),
        ),
        TinyDataset(
            "tinyWinogrande",
            "winogrande_xl",
            "validation",
            frozenset({"answer", "input_formatted", "option1", "option2", "sentence"}),
        ),
        TinyDataset(
            "tinyGSM8k", "main", "test", frozenset({"answer", "input_formatted", "question"})
        ),
    )
}


def load_rows(dataset: TinyDataset, data_dir: str | None, check: RowCheck) -> list[dict[str, Any]]:
    """The dataset's 100 rows in order, from `data_dir` or (None) the hub; ValueError naming the
    source when a row count, a row's fields or a row's content is wrong."""
    if data_dir is None:
        source, rows = f"{dataset.hub_id} (hub)", _hub_rows(dataset)
    else:
        path = Path(data_dir) / f"{dataset.name}.jsonl"
        source, rows = str(path), _file_rows(path, data_dir)
    if len(rows) != ROWS:
        raise ValueError(f"{source}: {len(rows)} rows; a tinyBenchmarks dataset has exactly {ROWS}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != dataset.fields:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{source}: row {index} has fields {got}; expected {sorted(dataset.fields)}"
            )
        problem = check(row)
        if problem:
            raise ValueError(f"{source}: row {index} {problem}")
    return rows


def _file_rows(path: Path, data_dir: str) -> list[Any]:
    directory = Path(data_dir)
    if not directory.is_dir():
        raise ValueError(f"--data {data_dir!r} is not a directory")
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("*.jsonl")) or ["no .jsonl file"]
        raise ValueError(f"{path}: missing (the data directory holds {', '.join(present)})")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    return rows


def _hub_rows(dataset: TinyDataset) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "loading tinyBenchmarks from the hub needs the datasets package: "
            "pip install calibft[retention], or give local files with --data DIR"
        ) from None
    try:
        loaded = datasets.load_dataset(dataset.hub_id, dataset.config, split=dataset.split)
    except Exception as err:  # offline, renamed, gated: the hub's many errors end the same way
        raise ValueError(
            f"{dataset.hub_id}: cannot load from the hub ({err}); give local files with --data DIR"
        ) from None
    return [dict(row) for row in loaded]
