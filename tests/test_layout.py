"""The package's import graph: no cycles (function-local imports included) and one-way layers —
what is asked (targets) and how a model answers (lm) never import what is measured (eval) or the
recipe (train); eval never imports train; only the CLI entry points import the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import calibft

ROOT = Path(calibft.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every calibft module `name` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(
                    candidate if candidate in MODULES or alias.name == "_core" else node.module
                )
    return {m for m in found if m.startswith("calibft") and m != "calibft._core"}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_import_names_an_existing_module():
    missing = {(a, b) for a, targets in GRAPH.items() for b in targets if b not in MODULES}
    assert not missing


def test_no_import_cycles():
    # A module must not reach itself through the graph.
    def reach(start: str) -> set[str]:
        seen, stack = set(), list(GRAPH[start])
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(GRAPH.get(node, ()))
        return seen

    cyclic = sorted(name for name in GRAPH if name in reach(name))
    assert cyclic == []


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "calibft"


def test_layers_point_one_way():
    forbidden = {
        "targets": {"lm", "eval", "train", "cli"},
        "lm": {"targets", "eval", "train", "cli"},
        "eval": {"train", "cli"},
        "train": {"cli"},
    }
    wrong = sorted(
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if layer(b) in forbidden.get(layer(a), set())
    )
    assert wrong == []


def test_only_entry_points_import_the_cli():
    assert sorted(a for a, targets in GRAPH.items() if "calibft.cli" in targets) == [
        "calibft.__main__"
    ]


def benchmark_of(name: str) -> str | None:
    """The benchmark a module belongs to (`calibft.eval.benchmarks.<name>[.<part>]`), or None."""
    parts = name.split(".")
    return parts[3] if parts[:3] == ["calibft", "eval", "benchmarks"] and len(parts) > 3 else None


def test_benchmarks_never_import_each_other():
    crossing = sorted(
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if benchmark_of(a) and benchmark_of(b) and benchmark_of(a) != benchmark_of(b)
    )
    assert crossing == []


def test_benchmarks_reach_the_model_only_through_the_lm_protocol():
    """No `lm.model` / `lm.tokenizer` in a benchmark: what a backend must serve is the `LM`
    protocol, nothing behind it (tries are built from the chat format, `lm.chat`)."""
    reaching = sorted(
        f"{name}:{node.lineno} .{node.attr}"
        for name, path in MODULES.items()
        if benchmark_of(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and node.attr in {"model", "tokenizer"}
        and isinstance(node.value, ast.Name)
        and node.value.id == "lm"
    )
    assert reaching == []


def test_every_registered_benchmark_is_its_own_module():
    from calibft.eval import BENCHMARKS

    assert all(BENCHMARKS[name] == f"calibft.eval.benchmarks.{name}" for name in BENCHMARKS)
    assert {benchmark_of(m) for m in MODULES} - {None} == set(BENCHMARKS)
