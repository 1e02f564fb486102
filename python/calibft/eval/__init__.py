"""What is measured: benchmarks, each one module, run by `calibft.eval.runner`.

`BENCHMARKS` maps a benchmark's name to its module; modules are imported only when selected, so
listing them (`calibft eval --list`) loads no model code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS: dict[str, str] = {
    "structured": "calibft.eval.structured",
    "categorical": "calibft.eval.categorical",
    "open_random": "calibft.eval.open_random",
    "mcq": "calibft.eval.mcq",
    "noveltybench": "calibft.eval.noveltybench",
    "retention": "calibft.eval.retention",
    "paloma": "calibft.eval.perplexity",
}
DEFAULT_BENCHMARKS = ("structured",)


def load_benchmark(name: str) -> ModuleType:
    """The module of benchmark `name`; ValueError naming the known ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} (calibft eval --list)"
        )
    return importlib.import_module(BENCHMARKS[name])
