"""Settings shared by every benchmark of an evaluation run, and how a run's settings are resolved.

Each benchmark has its own `Config` dataclass (in its module). A run's values come, lowest
precedence first, from the defaults, a config file (top-level keys for the shared settings and for
every selected benchmark that has the key; a table per benchmark, e.g. ``[structured]``, ignored
when that benchmark is not selected, so one file serves runs of any subset), the
command-line flags (likewise), then ``KEY=VALUE`` overrides (``samples=200`` for every benchmark
that has it, ``structured.samples=200`` for one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibft.config import build, option, parse_overrides, read_config_file
from calibft.eval import BENCHMARKS
from calibft.lm import BACKENDS, DTYPES


@dataclass
class EvalConfig:
    """The run: which model and checkpoints, where the report goes, how the model runs."""

    model: str = option(
        "smollm2-135m", "model alias, HF id, local dir or .gguf file", cache_key=False
    )  # the loaded model's own id is part of every cache key (runner.cache_path)
    adapters: list[str] = option(
        [],
        "LoRA adapter directories (the base model is always evaluated)",
        flag=False,
        cache_key=False,
    )
    adapter_scale: list[float] = option(
        [1.0],
        "LoRA scales to evaluate each adapter at, e.g. 0.25,0.5,1: each its own checkpoint "
        "<adapter>@<scale>; 0 is the base model, above 1 amplifies the adapter",
        min=0,
        cache_key=False,
    )  # each scale is in its checkpoint's fingerprint instead
    output: str = option(
        "eval_out", "output directory (report.json, report.md, plots/, cache/)", cache_key=False
    )
    seed: int = option(
        0,
        "seed of every random draw (per item, the same for every checkpoint)",
        min=0,
        max=2**63 - 1,
    )
    backend: str = option("hf", "generation backend: hf (transformers) or vllm", choices=BACKENDS)
    # The device's kind and the resolved dtype are in every cache key (runner.cache_path): a
    # record computed on a CPU is never reused on a GPU.
    device: str = option(
        "auto",
        "torch device; auto: cuda:LOCAL_RANK under a launcher, else the model over every visible "
        "GPU (device_map=auto), else cpu",
        cache_key=False,
    )
    dtype: str = option(
        "auto",
        "model dtype (auto: bfloat16 on CUDA, float32 on CPU)",
        choices=("auto", *DTYPES),
        cache_key=False,
    )
    sample_batch_size: int = option(250, "sequences per generation batch (hf backend)", min=1)
    batch_items: int = option(
        16,
        "pending items a benchmark runs at once (its run_batch; 1: one at a time); the backend "
        "splits their rows into passes that fit the free memory",
        min=1,
        cache_key=False,
    )
    plots: bool = option(True, "write PNG plots", cache_key=False)
    progress: bool = option(True, "show progress bars", cache_key=False)


def cache_fields(config: Any) -> dict[str, Any]:
    """A config's fields that change an item's record: all but those marked cache_key=False
    (such as which items are selected, or where the report goes)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("cache_key", True)
    }


def resolve(
    configs: Mapping[str, type],
    *,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> tuple[EvalConfig, dict[str, Any]]:
    """The shared config and one config per benchmark (``configs``: name -> Config class)."""
    file_values = read_config_file(config_file) if config_file is not None else {}
    layers = [file_values, dict(flags or {}), _namespaced(parse_overrides(overrides))]
    shared_keys = {f.name for f in dataclasses.fields(EvalConfig)}
    keys = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in configs.items()}
    shared: list[dict[str, Any]] = []
    per_bench: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for layer in layers:
        top: dict[str, Any] = {}
        for key, value in layer.items():
            if key in configs and isinstance(value, Mapping):
                per_bench[key].append(dict(value))
            elif key in BENCHMARKS and isinstance(value, Mapping):
                continue  # a table for a benchmark this run does not select
            elif key in shared_keys:
                top[key] = value
            elif any(key in names for names in keys.values()):
                for name, names in keys.items():
                    if key in names:
                        per_bench[name].append({key: value})
            else:
                known = sorted(shared_keys | set().union(*keys.values()))
                raise ValueError(
                    f"unknown eval key {key!r} for benchmark(s) {', '.join(configs)}; "
                    f"known keys: {', '.join(known)}"
                )
        shared.append(top)
    return (
        build(EvalConfig, *shared, where="eval"),
        {name: build(cls, *per_bench[name], where=f"{name}") for name, cls in configs.items()},
    )


def _namespaced(values: Mapping[str, Any]) -> dict[str, Any]:
    """``bench.key=value`` overrides into a ``{bench: {key: value}}`` table."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        bench, dot, name = key.partition(".")
        if dot:
            out.setdefault(bench, {})[name] = value
        else:
            out[key] = value
    return out
