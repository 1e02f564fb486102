"""The evaluation loop shared by every benchmark: checkpoints × benchmarks × items.

The runner owns what no benchmark should repeat: resolving and checking checkpoints (base model +
LoRA adapters), one model backend for the run, per-item seeds, the on-disk per-item cache (an
interrupted run resumes where it stopped; a changed setting never reuses a stale record), progress
bars, splitting sample budgets into shards, batches of items for a benchmark's `run_batch`, the
share of a rank under a launcher (ranks meet only in the cache), and the reports. A benchmark
supplies what `calibft.eval.contract` lists (docs/adding-a-benchmark.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    placement: Mapping[str, str],
) -> Path:
    """The cache entry of one item's record; its name changes with every setting that changes the
    record, including the device's kind and the dtype (`placement`)."""
    key = json.dumps(
        {
            "model": model_id,
            "placement": dict(placement),
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


@dataclass(frozen=True)
class Ranks:
    """This process's share of a launched run (``torchrun``, ``accelerate launch``): rank `rank`
    of `world` processes, on the device of `local_rank` (None: not launched, one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        """From the launcher's RANK, WORLD_SIZE and LOCAL_RANK (one process without them)."""
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(env.get("RANK", "-1"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={env.get('RANK')} is not one of 0..{world - 1} (WORLD_SIZE)")
        return cls(rank, world, int(env.get("LOCAL_RANK", rank)))


WAIT_SECONDS = 1.0
"""How often rank 0 looks for the other ranks' records in the cache."""


def evaluate(config: EvalConfig, benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    """Run every benchmark (name -> its Config) on the base model and each adapter in this one
    process; write report.json, report.md and plots to ``config.output`` and return the report.

    Every user mistake raises ValueError before any generation starts.
    """
    report = evaluate_rank(config, benchmarks, Ranks())
    assert report is not None  # rank 0 of 1 writes the report
    return report


def evaluate_rank(
    config: EvalConfig, benchmarks: Mapping[str, Any], ranks: Ranks
) -> dict[str, Any] | None:
    """`evaluate` as rank `ranks.rank` of a launched run: the (checkpoint, benchmark, item) work
    is dealt over the ranks in blocks of `batch_items`, each rank writing its records to the
    shared cache; rank 0
    waits until every record is there, then writes and returns the report (its config records
    ``num_processes``); the other ranks return None once their share is done."""
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
        local_rank=ranks.local_rank,
        sample_batch_size=config.sample_batch_size,
        progress=config.progress,
    )
    for name, module in modules.items():
        for checkpoint in checkpoints:
            module.check(checkpoint, benchmarks[name])
    placement = {"device": backend.device_type, "dtype": backend.dtype}

    def path_of(checkpoint: Checkpoint, name: str, item: Item[Any]) -> Path:
        return cache_path(
            output, name, checkpoint, item, benchmarks[name], config, backend.model_id, placement
        )

    # Blocks of `batch_items` consecutive items (single items for a benchmark without run_batch)
    # are dealt round-robin over the ranks. A block is one batch whatever the number of
    # processes, so a sharded run computes exactly the records one process computes (batched
    # log-likelihoods depend on their batch through float rounding).
    blocks: list[tuple[Checkpoint, str, list[Item[Any]]]] = []
    for checkpoint in checkpoints:
        for name, module in modules.items():
            size = config.batch_items if module.run_batch is not None else 1
            chosen = items[name]
            blocks += [
                (checkpoint, name, chosen[i : i + size]) for i in range(0, len(chosen), size)
            ]
    mine = blocks[ranks.rank :: ranks.world]
    where = f" rank {ranks.rank}/{ranks.world}" if ranks.world > 1 else ""
    bar = tqdm(total=sum(len(b) for _, _, b in mine), unit="item", disable=not config.progress)
    lm, current = None, None
    for checkpoint, name, block in mine:
        bar.set_description(f"{name} {checkpoint.name}{where}")
        batch = [item for item in block if not path_of(checkpoint, name, item).is_file()]
        if batch:
            if current != checkpoint:
                lm, current = backend.session(checkpoint), checkpoint
            for item, record in zip(
                batch,
                _run(modules[name], lm, batch, benchmarks[name], states[name], config.seed),
                strict=True,
            ):
                record = {
                    "checkpoint": checkpoint.name,
                    "group": item.group,
                    "section": item.section,
                    **{k: finite_or_none(v) for k, v in record.items()},
                }
                atomic_write_text(path_of(checkpoint, name, item), json.dumps(record))
        bar.update(len(block))
    bar.close()
    work = [(c, name, item) for c, name, block in blocks for item in block]
    if ranks.rank != 0:
        return None
    paths = [path_of(c, name, item) for c, name, item in work]
    _wait_for(paths, config.progress)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in modules}
    for (_, name, _), path in zip(work, paths, strict=True):
        records[name].append(json.loads(path.read_text("utf-8")))
    run_config = {
        **dataclasses.asdict(config),
        "model_id": backend.model_id,
        "placement": placement,
        "num_processes": ranks.world,
        **{name: dataclasses.asdict(cfg) for name, cfg in benchmarks.items()},
    }
    results = {name: (modules[name], records[name], states[name]) for name in modules}
    return write_outputs(output, run_config, results, plots=config.plots)


def _run(
    module: Benchmark, lm: Any, batch: Sequence[Item[Any]], config: Any, state: Any, seed: int
) -> list[dict[str, Any]]:
    """The records of `batch`: one `run_batch` call when the benchmark has it and the batch holds
    several items, else `run_item` per item (the same records, seeds from `item_seed`)."""
    seeds = [item_seed(seed, item.key) for item in batch]
    if module.run_batch is None or len(batch) == 1:
        return [
            module.run_item(lm, item, config, state, s)
            for item, s in zip(batch, seeds, strict=True)
        ]
    records = module.run_batch(lm, batch, config, state, seeds)
    if len(records) != len(batch):
        raise RuntimeError(f"{module.NAME}.run_batch gave {len(records)} records for {len(batch)}")
    return records


def _wait_for(paths: Sequence[Path], progress: bool) -> None:
    """Return once every path exists: the other ranks' records (a rank that dies stops the run
    through its launcher; a rerun computes only the records that are missing)."""
    missing = [path for path in paths if not path.is_file()]
    bar = tqdm(
        total=len(paths),
        initial=len(paths) - len(missing),
        desc="records of the other ranks",
        unit="item",
        disable=not progress or not missing,
    )
    while missing:
        time.sleep(WAIT_SECONDS)
        left = [path for path in missing if not path.is_file()]
        bar.update(len(missing) - len(left))
        missing = left
    bar.close()
