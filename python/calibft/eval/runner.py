"""The evaluation loop shared by every benchmark: checkpoints × benchmarks × items.

The runner owns what no benchmark should repeat: resolving and checking checkpoints (base model +
LoRA adapters), one model backend for the run, per-item seeds, the on-disk per-item cache (an
interrupted run resumes where it stopped; a changed setting never reuses a stale record), progress
bars, splitting sample budgets into shards, and the reports. A benchmark supplies what
`calibft.eval.contract` lists (docs/adding-a-benchmark.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from calibft.eval import load_benchmark
from calibft.eval.config import EvalConfig, cache_fields
from calibft.eval.contract import Benchmark, Item
from calibft.eval.report import finite_or_none, safe_filename, write_outputs
from calibft.files import atomic_write_text
from calibft.lm import Checkpoint, open_backend, resolve_checkpoints


def item_seed(seed: int, key: Sequence[Any]) -> int:
    """A per-item seed: independent of item order and of which items are already cached, and the
    same for every checkpoint (common random numbers make checkpoints comparable)."""
    text = json.dumps([seed, *key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def cache_path(
    output: Path,
    name: str,
    checkpoint: Checkpoint,
    item: Item[Any],
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
            "shared": cache_fields(shared),
            "item": list(item.key),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return output / "cache" / name / checkpoint.name / f"{safe_filename(item.group)}-{digest}.json"


def evaluate(config: EvalConfig, benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """Run every benchmark (name -> its Config) on the base model and each adapter; write
    report.json, report.md and plots to ``config.output`` and return the report.

    Every user mistake raises ValueError before any generation starts.
    """
    if not benchmarks:
        raise ValueError("no benchmark selected")
    modules: dict[str, Benchmark] = {name: load_benchmark(name) for name in benchmarks}
    checkpoints = resolve_checkpoints(config.adapters, config.adapter_scale)
    items: dict[str, list[Item[Any]]] = {}
    states: dict[str, Any] = {}
    for name, module in modules.items():
        chosen = module.items(benchmarks[name])
        if not chosen:
            raise ValueError(f"{name}: the settings select no items")
        items[name] = [shard for item in chosen for shard in item.shards()]
        keys = [item.key for item in items[name]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: two items share a key")
        wrong = {i.section for i in items[name]} - {None, *module.SECTIONS}
        if wrong or (module.SECTIONS and any(i.section is None for i in items[name])):
            raise ValueError(f"{name}: item sections {sorted(map(str, wrong))} are not in SECTIONS")
        states[name] = module.setup(benchmarks[name], chosen)
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
        for checkpoint in checkpoints:
            module.check(checkpoint, benchmarks[name])

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in modules}
    for checkpoint in checkpoints:
        lm = None
        for name, module in modules.items():
            bar = tqdm(
                items[name],
                desc=f"{name} {checkpoint.name}",
                unit="item",
                disable=not config.progress,
            )
            for item in bar:
                path = cache_path(
                    output, name, checkpoint, item, benchmarks[name], config, backend.model_id
                )
                if not path.is_file():
                    if lm is None:
                        lm = backend.session(checkpoint)
                    record = module.run_item(
                        lm, item, benchmarks[name], states[name], item_seed(config.seed, item.key)
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
    results = {name: (modules[name], records[name], states[name]) for name in modules}
    return write_outputs(output, run_config, results, plots=config.plots)
