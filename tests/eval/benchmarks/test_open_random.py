"""The open-ended random-generation benchmark (docs/benchmarks/open_random.md): its prompts, the
exact first-token support, answer counting, the summary, and runs on a tiny local model through
`evaluate` and the CLI."""

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from tiny_models import CannedSession, tiny_model, tiny_tokenizer

from calibft.chat import ChatFormat
from calibft.cli import main as cli_main
from calibft.config import build, validate
from calibft.eval.benchmarks import open_random
from calibft.eval.benchmarks.open_random import Config, top_p_supports, unique_fraction
from calibft.eval.config import EvalConfig
from calibft.eval.prompting import ssot
from calibft.eval.runner import evaluate

PROMPTS_SHA256 = "10f2a3335e1bd0f1bc039036ba538aae8ef03aae9efa7216eb95f7d3f7e694e0"


def session(texts=(), cls=CannedSession):
    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer)
    return cls(tiny_model(tokenizer), tokenizer, chat, [chat.end_token_id], texts=tuple(texts))


def item_for(category, config=None):
    config = config or Config(categories=[category])
    (item,) = open_random.items(config)
    return item


# --- prompts --------------------------------------------------------------------------------


def test_the_102_prompts_are_the_papers() -> None:
    prompts = open_random.load_prompts()
    assert len(prompts) == 102
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest() == PROMPTS_SHA256
    verbs = ("Think of", "Choose", "Name", "Pick")
    assert all(p.startswith(verbs[i % 4] + " a random ") for i, p in enumerate(prompts))
    categories = [open_random.category(p) for p in prompts]
    assert len(set(categories)) == 102
    assert (categories[2], categories[24], categories[65]) == ("city", "mammal", "weekday")


def test_items_select_categories_then_spacing() -> None:
    keys = [item.key for item in open_random.items(Config())]
    assert len(keys) == len(set(keys)) == 102
    chosen = open_random.items(Config(categories=["weekday", "city"]))
    assert [i.group for i in chosen] == ["city", "weekday"]  # the prompts' own order
    assert [i.payload.prompt_id for i in open_random.items(Config(prompts=3))] == [0, 50, 101]


def test_config_defaults_follow_the_mode() -> None:
    plain, under_ssot = Config(), Config(ssot=True)
    assert (plain.max_new_tokens, plain.support, plain.samples) == (16, True, 100)
    assert (under_ssot.max_new_tokens, under_ssot.support, under_ssot.samples) == (4096, False, 100)
    assert Config(ssot=True, max_new_tokens=64).max_new_tokens == 64  # a value the user set is kept
    with pytest.raises(ValueError, match="drop --support"):
        validate(Config(ssot=True, support=True))
    with pytest.raises(ValueError, match="unknown open_random categories town"):
        open_random.items(build(Config, {"categories": "city,town"}))


# --- first-token support --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "threshold", "size"),
    [
        ([0.6, 0.2, 0.1, 0.1], 0.9, 3),
        ([0.1, 0.6, 0.1, 0.2], 0.9, 3),  # order of the input does not matter
        ([0.5, 0.25, 0.125, 0.125], 0.5, 1),  # exact boundaries (dyadic: no rounding)
        ([0.5, 0.25, 0.125, 0.125], 0.75, 2),
        ([0.5, 0.25, 0.125, 0.125], 0.7500001, 3),
        ([0.5, 0.25, 0.125, 0.125], 1.0, 4),
        ([0.4, 0.3, 0.2], 0.95, 3),  # the mass never reaches τ: the full length
        ([1.0, 0.0, 0.0], 0.99, 1),
    ],
)
def test_top_p_support_hand_cases(probs, threshold, size) -> None:
    assert top_p_supports(probs, [threshold]) == [size]
    assert top_p_supports(torch.tensor(probs, dtype=torch.float64), [threshold]) == [size]


def test_top_p_supports_many_thresholds_at_once() -> None:
    assert top_p_supports([0.5, 0.25, 0.125, 0.125], [0.01, 0.5, 0.6, 0.875, 0.99]) == [
        1,
        1,
        2,
        3,
        4,
    ]
    assert top_p_supports(np.full(1024, 1 / 1024), [0.9]) == [922]  # 922/1024 is the first >= 0.9


@pytest.mark.parametrize(
    ("probs", "threshold"),
    [
        ([], 0.9),
        ([[0.5, 0.5]], 0.9),
        ([0.5, np.nan], 0.9),
        ([0.5, -0.1], 0.9),
        ([0.5, 0.5], 0.0),
        ([0.5, 0.5], 1.5),
    ],
)
def test_top_p_support_rejects_bad_input(probs, threshold) -> None:
    with pytest.raises(ValueError):
        top_p_supports(probs, [threshold])


def test_support_reads_the_last_prompt_position() -> None:
    """The figures from the prefilled state equal those of a plain forward pass's logits at each
    prompt's own last token, for prompts of unequal length."""
    lm = session()
    for category in ("city", "musical instrument"):
        ids = lm.chat.prompt_ids(item_for(category).payload.prompt)
        figures = open_random.first_token_figures(lm, lm.prefill(ids))
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].float()
        sizes = top_p_supports(torch.softmax(logits, -1), open_random.THRESHOLDS)
        assert list(figures["support_by_threshold"].values()) == sizes
        assert figures["support_90"] == sizes[open_random.THRESHOLDS.index(0.9)]
        assert len(figures["first_tokens"]) == open_random.TOP_FIRST_TOKENS
        assert figures["first_tokens"][0][1] == pytest.approx(
            float(torch.softmax(logits, -1).max())
        )
    assert list(figures["support_by_threshold"])[:3] == ["p_0p01", "p_0p05", "p_0p1"]


# --- counting -------------------------------------------------------------------------------


def test_unique_fraction_counts_empties_in_the_denominator_only() -> None:
    assert unique_fraction(["alpha", "", "beta", "alpha", "gamma"]) == pytest.approx(0.6)
    assert unique_fraction(["", ""]) == 0.0
    with pytest.raises(ValueError):
        unique_fraction([])


def test_record_counts_normalized_answers() -> None:
    lm = session(["alpha", "", "beta", "alpha", "gamma"])
    config = Config(samples=5, max_new_tokens=64)
    record = open_random.run_item(lm, item_for("city"), config, None, seed=7)
    assert (record["num_unique"], record["unique_fraction"], record["empty_output_count"]) == (
        3,
        0.6,
        1,
    )
    assert record["output_counts"] == {"alpha": 2, "beta": 1, "gamma": 1}
    assert record["truncated_count"] == 0
    assert lm.calls == [
        {
            "ids": tuple(lm.chat.prompt_ids(item_for("city").payload.prompt)),
            "n": 5,
            "seed": 7,
            "max_new_tokens": 64,
        }
    ]
    json.dumps(record, allow_nan=False)


def test_record_normalizes_before_counting() -> None:
    lm = session(['"Paris"', "Paris", "Paris.", "<think>hmm</think>Lima", "  ", "Rome\nis nice"])
    record = open_random.run_item(
        lm, item_for("city"), Config(samples=6, max_new_tokens=64), None, seed=0
    )
    assert record["output_counts"] == {"Paris": 2, "Paris.": 1, "Lima": 1, "Rome": 1}
    assert (record["empty_output_count"], record["think_tag_count"]) == (1, 1)
    assert record["normalized_outputs"][0] == "Paris" and record["raw_outputs"][0] == '"Paris"'
    short = open_random.run_item(
        lm, item_for("city"), Config(samples=6, max_new_tokens=2), None, seed=0
    )
    lengths = [len(lm.tokenizer.encode(t, add_special_tokens=False)) for t in lm.texts]
    assert short["truncated_count"] == sum(n >= 2 for n in lengths)


def test_ssot_mode_counts_extracted_answers() -> None:
    texts = [
        "<random_string>q8Zr</random_string>\n<thinking>seeded</thinking>\n"
        "<answer>Alpha City</answer>",
        "<random_string>x</random_string><answer> Beta   Town </answer>",
        "Gamma Village",  # no answer tag: strict extraction gives nothing
    ]
    lm = session(texts)
    config = Config(samples=3, ssot=True)
    record = open_random.run_item(
        lm, item_for("city", Config(categories=["city"], ssot=True)), config, None, seed=0
    )
    assert record["normalized_outputs"] == ["Alpha City", "Beta Town", ""]
    assert (record["ssot_degraded_count"], record["num_unique"], record["support_90"]) == (
        1,
        2,
        None,
    )
    assert "support_by_threshold" not in record
    prompt = item_for("city").payload.prompt
    assert lm.calls[0]["ids"] == tuple(ssot.prompt_ids(lm.chat, prompt, ssot.DAG))
    assert lm.calls[0]["max_new_tokens"] == 4096
    lenient = open_random.run_item(
        lm, item_for("city"), Config(samples=3, ssot=True, ssot_strict=False), None, seed=0
    )
    assert lenient["normalized_outputs"] == ["Alpha City", "Beta Town", "Gamma Village"]


# --- summary --------------------------------------------------------------------------------


def hand_record(prompt, support, fraction, *, empty=0, think=0):
    sizes = {open_random.threshold_key(t): support for t in open_random.THRESHOLDS}
    return {
        "prompt": prompt,
        "support_90": support,
        "support_by_threshold": sizes if support else None,
        "unique_fraction": fraction,
        "num_unique": int(fraction * 10),
        "samples": 10,
        "empty_output_count": empty,
        "think_tag_count": think,
        "truncated_count": 0,
    }


def test_summary_over_prompts() -> None:
    records = [
        hand_record("a", 2, 0.1),
        hand_record("b", 10, 0.5, empty=3),
        hand_record("c", 300, 0.3, think=2),
    ]
    summary = open_random.summarize(records, None)
    assert summary["mean_support_90"] == pytest.approx(104.0)
    assert (summary["median_support_90"], summary["min_support_90"], summary["max_support_90"]) == (
        10,
        2,
        300,
    )
    assert summary["mean_unique_fraction"] == pytest.approx(0.3)
    assert summary["median_unique_fraction"] == pytest.approx(0.3)
    assert summary["mean_num_unique"] == pytest.approx(3.0)
    assert (summary["total_empty_outputs"], summary["prompts_with_empty_outputs"]) == (3, 1)
    assert (summary["total_outputs_with_think_tags"], summary["prompts_with_think_tags"]) == (2, 1)
    assert summary["support_by_threshold"]["p_0p5"]["median"] == 10
    assert summary["prompts"][1] == {"prompt": "b", "support_90": 10, "unique_fraction": 0.5}
    under_ssot = open_random.summarize(
        [hand_record("a", None, 0.2) | {"ssot_degraded_count": 5}], None
    )
    assert under_ssot["mean_support_90"] is None and under_ssot["ssot_degraded_rate"] == 0.5


def test_showcase_answers_follow_the_papers_display_rule() -> None:
    counts = {
        "base": {"Paris": 50, "London": 30, "Tokyo": 5},
        "soft": {"Tokyo": 20, "Lima": 20, "Paris": 10},
    }
    # Top 2 of each, ranked by peak count, then by total count (Tokyo 25 before Lima 20).
    assert open_random.showcase_answers(counts, per_state=2) == ["Paris", "London", "Tokyo", "Lima"]
    assert open_random.showcase_answers(counts, per_state=2, shown=3) == [
        "Paris",
        "London",
        "Tokyo",
    ]


# --- end to end -----------------------------------------------------------------------------


def run_eval(model_dir, output, adapters=(), **settings):
    shared = EvalConfig(
        model=str(model_dir),
        adapters=[str(a) for a in adapters],
        output=str(output),
        progress=False,
    )
    config = Config(**{"categories": ["city", "weekday"], "samples": 4, **settings})
    return evaluate(shared, {"open_random": config})


def test_end_to_end_on_a_tiny_model(model_dir, adapter_dir, tmp_path, monkeypatch) -> None:
    report = run_eval(model_dir, tmp_path, [adapter_dir])
    assert json.loads((tmp_path / "report.json").read_text()) == report
    result = report["benchmarks"]["open_random"]
    assert list(result["checkpoints"]) == ["base", "soft-run"]
    items = result["items"]
    assert len(items) == 4
    width = json.loads((model_dir / "config.json").read_text())["vocab_size"]  # the logits row
    for item in items:
        assert sum(item["output_counts"].values()) + item["empty_output_count"] == 4
        assert item["unique_fraction"] == len(item["output_counts"]) / 4 == item["num_unique"] / 4
        sizes = list(item["support_by_threshold"].values())
        assert sizes == sorted(sizes) and 1 <= sizes[0] and sizes[-1] <= width
    for name, summary in result["checkpoints"].items():
        mine = [i for i in items if i["checkpoint"] == name]
        assert summary["mean_support_90"] == pytest.approx(np.mean([i["support_90"] for i in mine]))
        assert summary["mean_unique_fraction"] == pytest.approx(
            np.mean([i["unique_fraction"] for i in mine])
        )
        assert [p["prompt"] for p in summary["prompts"]] == [i["prompt"] for i in mine]
        assert {"median_support_90", "median_unique_fraction"} <= set(summary)
    plots = tmp_path / "plots"
    assert (plots / "open_random_support.png").is_file() and (
        plots / "open_random_top_answers.png"
    ).is_file()
    rows = list(csv.DictReader((plots / "open_random_per_prompt.csv").open()))
    assert len(rows) == 4 and rows[0]["category"] == "city"
    assert "unique fraction by group" in (tmp_path / "report.md").read_text()
    # A second run is served from the cache: nothing is generated again.
    monkeypatch.setattr(open_random, "run_item", lambda *a: pytest.fail("cached item recomputed"))
    assert run_eval(model_dir, tmp_path, [adapter_dir])["benchmarks"] == report["benchmarks"]


def test_cli_runs_open_random_and_mcq(model_dir, adapter_dir, tmp_path, capsys) -> None:
    argv = [
        "eval",
        "open_random",
        "mcq",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter_dir),
        "--output",
        str(tmp_path),
        "--samples",
        "3",
        "--no-progress",
        "open_random.categories=mammal",
        "mcq.max_new_tokens=6",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "mean_support_90=" in out and "parse_rate=" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        report["config"]["open_random"]["samples"] == 3 and report["config"]["mcq"]["samples"] == 3
    )
    assert report["config"]["open_random"]["max_new_tokens"] == 16
    assert report["benchmarks"]["open_random"]["checkpoints"]["soft-run"]["prompts_evaluated"] == 1
    assert report["benchmarks"]["mcq"]["checkpoints"]["base"]["generations"] == 3
