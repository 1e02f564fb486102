import json

import numpy as np
import pytest

from calibft.eval import load_benchmark
from calibft.eval.benchmarks import structured
from calibft.eval.contract import Benchmark
from calibft.eval.report import (
    aggregate,
    build_report,
    group_aggregates,
    group_means,
    render_markdown,
    summary_lines,
    write_outputs,
)

AGGREGATES = structured.AGGREGATES
BENCH = load_benchmark("structured")


def _record(
    checkpoint, split, family, w1, *, valid=1.0, kl=0.5, exact_mass=None, exact_w1=None, mu=0.0
):
    return {
        "checkpoint": checkpoint,
        "section": split,
        "group": family,
        "split": split,
        "family": family,
        "params": {"mu": mu, "sigma": 1.0} if family == "gaussian" else {"lambda": 4.0},
        "valid_rate": valid,
        "normalized_w1": w1,
        "logit_kl": kl,
        "exact_valid_mass": exact_mass,
        "exact_normalized_w1": exact_w1,
        "exact_unresolved_mass": None if exact_mass is None else exact_mass / 100,
        "sample_values": [0.1, -0.3, 1.2] if family == "gaussian" else [3.0, 4.0, 4.0],
        "exact_histogram": None,
    }


def test_family_mean_then_median_and_mean() -> None:
    records = [
        _record("base", "test_ood_family", "a", 1.0),
        _record("base", "test_ood_family", "a", 3.0),  # family a: mean 2
        _record("base", "test_ood_family", "b", 10.0),  # family b: 10
        _record("base", "test_ood_family", "c", 0.5),
        _record("base", "test_ood_family", "c", None),  # non-finite prompts are skipped: c = 0.5
    ]
    assert group_means(records, "normalized_w1") == {"a": 2.0, "b": 10.0, "c": 0.5}
    assert aggregate(records, "normalized_w1", AGGREGATES["median_normalized_w1"][1]) == 2.0
    assert aggregate(
        records, "normalized_w1", AGGREGATES["mean_normalized_w1"][1]
    ) == pytest.approx(12.5 / 3)


def test_aggregate_undefined_if_a_family_has_no_finite_value() -> None:
    records = [
        _record("base", "test_ood_family", "a", 1.0),
        _record("base", "test_ood_family", "b", None),
        _record("base", "test_ood_family", "b", float("nan")),
    ]
    assert aggregate(records, "normalized_w1", np.median) is None
    assert aggregate([], "normalized_w1", np.median) is None


def test_report_schema_and_numbers(tmp_path) -> None:
    records = [
        _record(
            "base",
            "test_ood_family",
            "gaussian",
            0.4,
            valid=0.5,
            kl=2.0,
            exact_mass=0.2,
            exact_w1=0.3,
        ),
        _record(
            "base",
            "test_ood_family",
            "poisson",
            0.2,
            valid=0.7,
            kl=4.0,
            exact_mass=0.4,
            exact_w1=0.1,
        ),
        _record("base", "test_unseen_params", "gaussian", None, valid=0.0, kl=1.0),
        _record(
            "soft",
            "test_ood_family",
            "gaussian",
            0.1,
            valid=1.0,
            kl=0.2,
            exact_mass=0.9,
            exact_w1=0.05,
        ),
        _record(
            "soft",
            "test_ood_family",
            "poisson",
            0.3,
            valid=0.9,
            kl=0.4,
            exact_mass=0.8,
            exact_w1=0.07,
        ),
        _record("soft", "test_unseen_params", "gaussian", 0.2, valid=1.0, kl=0.3),
    ]
    config = {
        "model": "tiny",
        "samples": 3,
        "seed": 0,
        "exact": True,
        "selection": "paper_selected",
    }
    report = write_outputs(tmp_path, config, {"structured": (BENCH, records, None)}, plots=True)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    result = on_disk["benchmarks"]["structured"]
    assert list(result["checkpoints"]) == ["base", "soft"]
    ood = result["checkpoints"]["base"]["test_ood_family"]
    assert set(ood) == {
        "valid_rate",
        "median_normalized_w1",
        "mean_normalized_w1",
        "logit_kl",
        "exact_valid_mass",
        "exact_median_normalized_w1",
        "exact_unresolved_mass",
        "gof_pass_rate",
        "gof_tested",
    }
    assert (ood["gof_pass_rate"], ood["gof_tested"]) == (None, 0)  # no record has a p-value
    assert ood["valid_rate"] == pytest.approx(0.6)
    assert ood["median_normalized_w1"] == pytest.approx(0.3)
    assert ood["mean_normalized_w1"] == pytest.approx(0.3)
    assert ood["logit_kl"] == pytest.approx(3.0)
    assert ood["exact_valid_mass"] == pytest.approx(0.3)
    assert ood["exact_median_normalized_w1"] == pytest.approx(0.2)
    assert ood["exact_unresolved_mass"] == pytest.approx(0.003)
    unseen = result["checkpoints"]["base"]["test_unseen_params"]
    assert unseen["median_normalized_w1"] is None  # the only family has no valid sample
    assert unseen["exact_valid_mass"] is None  # not computed
    assert result["checkpoints"]["soft"]["test_unseen_params"]["median_normalized_w1"] == 0.2
    assert len(result["items"]) == len(records)
    assert all(set(p) == set(structured.REPORT_FIELDS) for p in result["items"])
    assert on_disk["config"] == config
    assert on_disk["versions"]["numpy"] == np.__version__

    markdown = (tmp_path / "report.md").read_text()
    assert "| figure | base | soft |" in markdown
    assert "| gaussian | 0.4 | 0.1 |" in markdown  # norm. W1 by family, side by side
    ood_md, unseen_md = markdown.split("### test_unseen_params")
    assert "| exact_valid_mass | 0.3 |" in ood_md
    assert "exact_valid_mass" not in unseen_md  # no checkpoint computed it there
    assert "| median_normalized_w1 | n/a | 0.2 |" in unseen_md  # undefined for one checkpoint only
    lines = summary_lines(report)
    assert any(
        "soft" in line and "test_unseen_params" in line and "median_normalized_w1=0.2" in line
        for line in lines
    )
    for name in (
        "overlay_test_ood_family_gaussian",
        "overlay_test_unseen_params_gaussian",
        "w1_test_ood_family",
    ):
        data = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG")
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_json_is_strict() -> None:
    records = [_record("base", "test_ood_family", "a", float("nan"))]
    report = build_report({}, {"structured": (BENCH, records, None)})
    assert (
        report["benchmarks"]["structured"]["checkpoints"]["base"]["test_ood_family"][
            "median_normalized_w1"
        ]
        is None
    )
    json.dumps(report, allow_nan=False)


def test_benchmark_without_sections_gets_flat_figures() -> None:
    import statistics

    aggregates = {"mean_score": ("score", statistics.fmean)}
    bench = Benchmark(
        NAME="toy",
        DESCRIPTION="a toy",
        Config=object,
        HEADLINE=(("mean score", "mean_score"),),
        items=lambda config: [],
        run_item=lambda *a: {},
        summarize=lambda records, state: group_aggregates(records, aggregates),
        TABLE_FIELDS=(("score", "score"),),
    )
    records = [
        {"checkpoint": "base", "group": "x", "section": None, "score": 1.0},
        {"checkpoint": "base", "group": "x", "section": None, "score": 3.0},
        {"checkpoint": "base", "group": "y", "section": None, "score": 5.0},
    ]
    report = build_report({"model": "m"}, {"toy": (bench, records, None)})
    assert report["benchmarks"]["toy"]["checkpoints"]["base"] == {
        "mean_score": 3.5
    }  # groups 2 and 5
    markdown = render_markdown(report, {"toy": bench})
    assert "| mean_score | 3.5 |" in markdown and "| y | 5 |" in markdown
    assert "| checkpoint | toy: mean score |\n|---|---|\n| base | 3.5 |" in markdown
    assert report["benchmarks"]["toy"]["sections"] == []


def test_atomic_writes_replace_whole_files_with_ordinary_permissions(tmp_path) -> None:
    import os

    from calibft.files import atomic_write_text

    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0o600
