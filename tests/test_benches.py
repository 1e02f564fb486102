"""Smoke check of the benchmark scripts: their quick mode runs and writes the documented JSON.

No timing is asserted (CI machines vary); the checks are on shape, types and the invariants a
correct run must satisfy (e.g. the baseline trie and calibft's trie have the same nodes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def run_quick(script: str, output: Path, *extra: str) -> dict:
    subprocess.run(
        [sys.executable, str(BENCHES / script), "--quick", "--output", str(output), *extra],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,  # generous: CI cores are often shared
    )
    return json.loads(output.read_text())


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_machine(machine: dict) -> None:
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert machine["gpu"] is None or isinstance(machine["gpu"], str)


pytestmark = pytest.mark.slow  # each runs a benchmark script end to end


def test_data_path_quick(tmp_path: Path) -> None:
    data = run_quick("bench_data_path.py", tmp_path / "dp.json", "--prompts", "12")
    assert data["bench"] == "data_path" and data["mode"] == "quick"
    check_machine(data["machine"])
    modes = {row["mode"] for row in data["configs"]}
    assert modes == {"separate", "pipelined"}
    for row in data["configs"]:
        assert row["tokenizer"] == "qwen3" and row["max_bins"] == 1001 and row["prompts"] == 12
        for key in ("total_s", "trie_mib", "peak_rss_mib", "rss_before_build_mib"):
            assert positive(row[key]), key
        assert (
            row["trie_nodes"] > row["values"] > 12
        )  # every value adds at least its end-token leaf
        assert row["peak_rss_mib"] >= row["rss_end_mib"] * 0.99
        assert row["targets_met"] is None  # targets are for the full 1988 prompts only
    separate, pipelined = sorted(data["configs"], key=lambda r: r["mode"] != "separate")
    assert positive(separate["spaces_s"]) and positive(separate["tries_s"])
    assert separate["total_s"] >= separate["tries_s"]
    # Both modes build the same tries.
    assert (separate["trie_nodes"], separate["values"]) == (
        pipelined["trie_nodes"],
        pipelined["values"],
    )
    families = data["space_time_by_family"]["families"]
    assert sum(f["prompts"] for f in families) == 12 and all(
        positive(f["seconds"]) for f in families
    )
    (baseline,) = data["baseline_pure_python"]
    assert baseline["nodes_match_calibft"] is True
    assert baseline["extrapolated_prompts"] == 1988
    assert positive(baseline["sample_s"]) and baseline["extrapolated_s"] > baseline["sample_s"]


def test_w1_quick(tmp_path: Path) -> None:
    data = run_quick("bench_w1.py", tmp_path / "w1.json", "--prompts", "30", "--samples", "100")
    assert data["bench"] == "w1" and data["mode"] == "quick"
    check_machine(data["machine"])
    assert (data["prompts"], data["samples_per_prompt"]) == (30, 100)
    for impl in ("calibft", "scipy"):
        assert all(positive(v) for v in data[impl].values())
    assert positive(data["speedup_scoring"]) and positive(data["speedup_end_to_end"])
    assert isinstance(data["target_met_scoring"], bool)
    # The two implementations compute the same quantity.
    assert 0 <= data["max_abs_diff"] < 1e-9 and 0 <= data["max_abs_diff_scoring_only"] < 1e-9


def test_loss_quick(tmp_path: Path) -> None:
    data = run_quick("bench_loss.py", tmp_path / "loss.json")
    assert data["bench"] == "loss" and data["mode"] == "quick"
    check_machine(data["machine"])
    (case,) = data["cases"]
    assert (case["vocab"], case["positions"]) == (49152, 128)
    assert {row["impl"] for row in data["rows"]} == {"fused", "dense", "compiled", "matmuls"}
    for impl in ("fused", "dense"):
        entry = case[impl]
        assert positive(entry["seconds"]) and positive(entry["peak_mib"])
        assert positive(entry["speedup_vs_dense"]) and positive(entry["memory_ratio_vs_dense"])
    assert math.isclose(case["dense"]["speedup_vs_dense"], 1.0)
    compiled = case["compiled"]
    if "error" in compiled:  # torch.compile may be unavailable: the error is recorded, not raised
        assert isinstance(compiled["error"], str) and compiled["error"]
        assert data["compile_error"] == compiled["error"]
    else:
        assert positive(compiled["seconds"]) and compiled["loss_abs_diff_vs_dense"] < 1e-4
    for row in data["rows"]:
        if "error" not in row:
            assert positive(row["loss"]) and positive(row["grad_hidden_norm"])
    # The fused loss computes the dense formula: same value, same gradient.
    assert 0 <= data["max_abs_loss_diff_fused_vs_dense"] < 1e-4
    assert case["fused"]["grad_norm_rel_diff_vs_dense"] < 1e-4
    assert isinstance(case["target_met_memory"], bool) and isinstance(
        case["target_met_speed"], bool
    )
    assert set(data["targets_met"]) == {"memory", "speed"}


def test_train_quick(tmp_path: Path) -> None:
    data = run_quick("bench_train.py", tmp_path / "train.json")
    assert data["bench"] == "train" and data["mode"] == "quick"
    check_machine(data["machine"])
    assert [row["method"] for row in data["methods"]] == ["soft", "hard"]
    for row in data["methods"]:
        assert row["steps"] == 2 == len(row["per_step"]) and row["batch_size"] == 8
        assert row["families"] == ["binomial", "gaussian"]
        assert row["max_bins"] == (1001 if row["method"] == "soft" else 16384)
        parts = row["seconds"]
        for key in ("data_s", "forward_s", "backward_s", "optimizer_s", "step_s"):
            assert positive(parts[key]), key
        inner = parts["data_s"] + parts["forward_s"] + parts["backward_s"] + parts["optimizer_s"]
        assert inner <= parts["step_s"] * 1.0001
        assert 0 < row["data_share"] < 1 and 0 < row["forward_backward_share"] < 1
        assert math.isclose(row["data_share"], parts["data_s"] / parts["step_s"])
        assert row["tokens"] > row["completion_tokens"] >= 2 * 8  # every example: >= 1 digit + end
        assert positive(row["tokens_per_s"]) and positive(row["target_build_s"])
        assert row["target_build_s_extrapolated_1988"] > row["target_build_s"]
        assert 0 < row["target_build_share_of_full_run"] < 1
        assert all(math.isfinite(s["loss"]) and s["loss"] >= 0 for s in row["per_step"])
        assert isinstance(row["target_met"], bool)
    assert isinstance(data["targets_met"], bool)


def test_eval_quick(tmp_path: Path) -> None:
    data = run_quick("bench_eval.py", tmp_path / "eval.json", "--samples", "40")
    assert data["bench"] == "eval" and data["mode"] == "quick"
    check_machine(data["machine"])
    (row,) = data["prompts"]
    assert row["family"] == "truncnorm" and row["max_bins"] == 1001 and row["decimals"] == 5
    assert 1 < row["values"] <= 1001
    assert row["values"] < row["internal_nodes"] + row["values"] <= row["trie_nodes"]
    assert 0 < row["exact_valid_mass"] <= 1 + 1e-9
    assert row["samples"] == 40 and row["sample_tokens"] >= 40  # at least the end token each
    assert (
        0 <= row["sampled_canonical_rate"] <= row["sampled_valid_rate"] <= 1
    )  # canonical strings parse as valid
    assert row["generations_per_s"] == pytest.approx(40 / row["sample_s"])
    for key in (
        "trie_build_s",
        "exact_s",
        "sample_s",
        "sample_s_per_1000",
        "exact_over_sampled_1000",
    ):
        assert positive(row[key]), key
    assert row["exact_s"] == min(row["exact_s_by_chunk"].values())
    (pruned,) = row["pruned_by_tolerance"].values()
    assert positive(pruned["exact_s"]) and positive(pruned["over_sampled_1000"])
    # the pruned pass's resolved mass and the mass it leaves unresolved bracket the full pass's
    assert pruned["valid_mass"] <= row["exact_valid_mass"] + 1e-6
    assert row["exact_valid_mass"] <= pruned["valid_mass"] + pruned["unresolved_mass"] + 1e-6
