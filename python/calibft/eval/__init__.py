"""What is measured: benchmarks, each one module or package under `calibft.eval.benchmarks`
named as it is registered, run by `calibft.eval.runner` on the contract of
`calibft.eval.contract`.

`BENCHMARKS` maps a benchmark's name to its module; modules are imported only when selected, and
their top-level imports are light, so listing them (`calibft eval --list`) loads no model code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from calibft.eval.contract import Benchmark

BENCHMARKS: dict[str, str] = {
    name: f"calibft.eval.benchmarks.{name}"
    for name in (
        "structured",
        "categorical",
        "open_random",
        "mcq",
        "noveltybench",
        "retention",
        "paloma",
    )
}
DEFAULT_BENCHMARKS = ("structured",)


def load_benchmark(name: str) -> Benchmark:
    """Benchmark `name` through its contract; ValueError naming the known ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} (calibft eval --list)"
        )
    return Benchmark.from_module(importlib.import_module(BENCHMARKS[name]), name)


def benchmark_description(name: str) -> str:
    """Benchmark `name`'s `DESCRIPTION` (a string literal), read from its source without running
    it: listing the benchmarks imports none of their dependencies (torch, transformers)."""
    unknown = f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}"
    spec = importlib.util.find_spec(BENCHMARKS[name]) if name in BENCHMARKS else None
    if spec is None or spec.origin is None:
        raise ValueError(unknown)
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "DESCRIPTION" for target in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise ValueError(f"benchmark {name!r}: {spec.origin} has no DESCRIPTION string literal")
