"""The evaluation loop shared by every benchmark: checkpoints × benchmarks × items.

The runner owns what no benchmark should repeat: resolving and checking checkpoints (base model +
LoRA adapters), one model backend for the run, per-item seeds, the on-disk per-item cache (an
interrupted run resumes where it stopped; a changed setting never reuses a stale record), progress
bars, and the reports. A benchmark module supplies its items and a per-item function
(docs/adding-a-benchmark.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from calibft.eval import load_benchmark
from calibft.eval.config import EvalConfig
from calibft.eval.report import finite_or_none, write_outputs
from calibft.files import atomic_write_text
from calibft.lm import Checkpoint, open_backend, resolve_checkpoints


@dataclass(frozen=True)
class Item:
    """One unit of a benchmark's work, run once per checkpoint and cached.

    ``key``: a stable JSON-able tuple naming the item (its cache entry and seed derive from it);
    ``group``: the aggregation unit; ``section``: an optional part of the report (e.g. a split);
    ``payload``: whatever the benchmark's ``run_item`` needs.
    """

    key: tuple[Any, ...]
    group: str
    payload: Any = field(default=None, compare=False, repr=False)
    section: str | None = None


def item_seed(seed: int, key: Sequence[Any]) -> int:
    """A per-item seed: independent of item order and of which items are already cached, and the
    same for every checkpoint (common random numbers make checkpoints comparable)."""
    text = json.dumps([seed, *key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def cache_fields(config: Any) -> dict[str, Any]:
    """A benchmark config's fields that change an item's record (not those marked cache_key=False,
    such as which items are selected)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("cache_key", True)
    }


def cache_path(
    output: Path,
    name: str,
    checkpoint: Checkpoint,
    item: Item,
    config: Any,
    shared: EvalConfig,
    model_id: str,
) -> Path:
    key = json.dumps(
        {
            "model": model_id,
            "checkpoint": checkpoint.fingerprint,
            "benchmark": name,
            "config": cache_fields(config),
            "shared": shared.cache_fields(),
            "item": list(item.key),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    safe_group = "".join(c if c.isalnum() or c in "-_" else "_" for c in item.group)[:40]
    return output / "cache" / name / checkpoint.name / f"{safe_group}-{digest}.json"


def evaluate(config: EvalConfig, benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """Run every benchmark (name -> its Config) on the base model and each adapter; write
    report.json, report.md and plots to ``config.output`` and return the report.

    Every user mistake raises ValueError before any generation starts.
    """
    if not benchmarks:
        raise ValueError("no benchmark selected")
    modules: dict[str, ModuleType] = {name: load_benchmark(name) for name in benchmarks}
    checkpoints = resolve_checkpoints(config.adapters)
    items = {}
    for name, module in modules.items():
        items[name] = module.items(benchmarks[name])
        if not items[name]:
            raise ValueError(f"{name}: the settings select no items")
        keys = [item.key for item in items[name]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: two items share a key")
    output = Path(config.output)
    backend = open_backend(
        config.backend,
        config.model,
        checkpoints,
        seed=config.seed,
        dtype=config.dtype,
        device=config.device,
        sample_batch_size=config.sample_batch_size,
        progress=config.progress,
    )
    for name, module in modules.items():
        if hasattr(module, "check"):
            for checkpoint in checkpoints:
                module.check(checkpoint, benchmarks[name])

    paths = {
        (name, c.name, item.key): cache_path(
            output, name, c, item, benchmarks[name], config, backend.model_id
        )
        for name in modules
        for c in checkpoints
        for item in items[name]
    }
    # Benchmarks may prepare their items once for the run (e.g. build tries), for pending ones only.
    prepared: dict[str, dict[tuple[Any, ...], Item]] = {}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in modules}
    for checkpoint in checkpoints:
        lm = None
        for name, module in modules.items():
            todo = [i for i in items[name] if not paths[(name, checkpoint.name, i.key)].is_file()]
            if todo and lm is None:
                lm = backend.session(checkpoint)
            if todo and name not in prepared:
                pending = [
                    i
                    for i in items[name]
                    if any(not paths[(name, c.name, i.key)].is_file() for c in checkpoints)
                ]
                ready = (
                    module.prepare(lm, pending, benchmarks[name])
                    if hasattr(module, "prepare")
                    else pending
                )
                prepared[name] = {i.key: i for i in ready}
            bar = tqdm(
                items[name],
                desc=f"{name} {checkpoint.name}",
                unit="item",
                disable=not config.progress,
            )
            for item in bar:
                path = paths[(name, checkpoint.name, item.key)]
                if not path.is_file():
                    job = prepared[name][item.key]
                    record = module.run_item(
                        lm, job, benchmarks[name], item_seed(config.seed, item.key)
                    )
                    record = {
                        "checkpoint": checkpoint.name,
                        "group": item.group,
                        "section": item.section,
                        **{k: finite_or_none(v) for k, v in record.items()},
                    }
                    atomic_write_text(path, json.dumps(record))
                records[name].append(json.loads(path.read_text("utf-8")))
    run_config = {
        **dataclasses.asdict(config),
        "model_id": backend.model_id,
        **{name: dataclasses.asdict(cfg) for name, cfg in benchmarks.items()},
    }
    results = {name: (modules[name], records[name]) for name in modules}
    return write_outputs(output, run_config, results, plots=config.plots)
