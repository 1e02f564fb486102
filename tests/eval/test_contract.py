"""Every registered benchmark against the contract docs/adding-a-benchmark.md describes
(`calibft.eval.contract`): required members of the right kinds, no undeclared hooks, and a
shard split that covers a sample budget exactly once."""

from __future__ import annotations

import dataclasses
import inspect
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from calibft.eval import BENCHMARKS, load_benchmark
from calibft.eval.contract import OPTIONAL, REQUIRED, Benchmark, Item

# Hooks of the earlier contract, replaced by setup/state and the headline table.
HOOK_NAMES = {"prepare", "comparison_table"}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_registered_benchmark_follows_the_contract(name) -> None:
    bench = load_benchmark(name)
    module = inspect.getmodule(bench.run_item)
    assert module is not None and module.__name__ == BENCHMARKS[name]
    assert bench.NAME == name and isinstance(bench.DESCRIPTION, str) and bench.DESCRIPTION
    assert len(bench.DESCRIPTION) <= 100 and "\n" not in bench.DESCRIPTION
    assert dataclasses.is_dataclass(bench.Config) and isinstance(bench.Config(), bench.Config)
    assert bench.HEADLINE and all(
        isinstance(label, str) and isinstance(key, str) for label, key in bench.HEADLINE
    )
    # A dotted HEADLINE key names a declared section.
    for _, key in bench.HEADLINE:
        if "." in key:
            assert key.split(".", 1)[0] in bench.SECTIONS
    params = {
        "items": ["config"],
        "run_item": ["lm", "item", "config", "state", "seed"],
        "summarize": ["records", "state"],
    }
    for hook, expected in params.items():
        assert list(inspect.signature(getattr(bench, hook)).parameters) == expected, hook
    real = vars(module)
    if "setup" in real:
        assert list(inspect.signature(real["setup"]).parameters) == ["config", "items"]
    if "check" in real:
        assert list(inspect.signature(real["check"]).parameters) == ["checkpoint", "config"]
    if "run_batch" in real:
        params = ["lm", "items", "config", "state", "seeds"]
        assert list(inspect.signature(real["run_batch"]).parameters) == params
    assert not HOOK_NAMES & set(real), "a hook the contract no longer has"


def test_every_member_is_required_or_optional_in_the_contract() -> None:
    fields = {f.name for f in dataclasses.fields(Benchmark)}
    assert fields == set(REQUIRED) | set(OPTIONAL)
    assert [f.name for f in dataclasses.fields(Benchmark) if f.default is dataclasses.MISSING] == (
        list(REQUIRED)
    )


def test_a_module_missing_a_required_member_is_refused() -> None:
    module = types.ModuleType("calibft.eval.benchmarks.toy")
    module.NAME, module.DESCRIPTION = "toy", "a toy"
    with pytest.raises(ValueError, match="lacks Config, HEADLINE, items, run_item, summarize"):
        Benchmark.from_module(module, "toy")
    for member in ("Config", "HEADLINE", "items", "run_item", "summarize"):
        setattr(module, member, dataclasses.make_dataclass("C", []) if member == "Config" else ())
    module.NAME = "other"
    with pytest.raises(ValueError, match="NAME and module name must both be 'toy'"):
        Benchmark.from_module(module, "toy")
    module.NAME = "toy"
    bench = Benchmark.from_module(module, "toy")
    assert bench.setup(None, []) is None and bench.plots("d", {}, []) == []
    assert bench.SECTIONS == () and bench.sections({"a": 1}) == [None]


@given(st.integers(1, 2000), st.integers(1, 300))
def test_shards_cover_the_budget_once_and_keep_their_keys(samples, size) -> None:
    item = Item(("prompt",), "g", "payload", samples=samples, shard_size=size)
    shards = item.shards()
    covered = [i for s in shards for i in range(s.shard.start, s.shard.start + s.shard.count)]
    assert covered == list(range(samples))
    assert all(s.key == ("prompt", s.shard.start, s.shard.count) for s in shards)
    assert all(s.payload == "payload" and s.samples == samples for s in shards)
    # A larger budget keeps every full shard of a smaller one (their cache entries are reused).
    larger = {
        s.key for s in Item(("prompt",), "g", samples=samples + size, shard_size=size).shards()
    }
    assert {s.key for s in shards if s.shard.count == size} <= larger
    assert Item(("p",), "g").shards() == [Item(("p",), "g")]
