"""The categorical benchmark (docs/benchmarks/categorical.md) on tiny local models: exact answer
probabilities against teacher forcing, sampled frequencies against the exact ones (chi-square),
the figures' definitions, the report, plots, cache and the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats
from tiny_models import teacher_forced_logprob, tiny_model

import calibft.eval.runner as runner
from calibft.cli import main as cli_main
from calibft.eval import load_benchmark
from calibft.eval.benchmarks import categorical
from calibft.eval.benchmarks.categorical import (
    Config,
    exact_figures,
    items,
    run_item,
    sampled_figures,
    setup,
)
from calibft.eval.config import EvalConfig
from calibft.eval.report import format_value, headline_table
from calibft.eval.runner import evaluate
from calibft.lm import HFSession
from calibft.targets import Target
from calibft.targets.categorical import load_targets

DIGITS = {
    "prompt": "Pick a number.",
    "targets": ["3", "8", "1", "10", "42"],
    "weights": [4, 3, 1, 1, 1],
    "group": "digits",
}
LETTERS = {"prompt": "Pick a letter.", "targets": ["A", "B", "C", "D"], "group": "letters"}
STATES = {
    "prompt": "Pick a state.",
    "targets": ["New York", "New Jersey", "Ohio"],
    "weights": [1, 2, 3],
    "group": "letters",
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def session(model, tokenizer, chat) -> HFSession:
    return HFSession(model, tokenizer, chat, [chat.end_token_id], sample_batch_size=5000)


def prepared(lm, tmp_path, records, **settings):
    """The config, the run state (its tokenizer checks and tries made) and the items."""
    config = Config(targets=[str(write_jsonl(tmp_path / "t.jsonl", records))], **settings)
    chosen = items(config)
    state = setup(config, chosen)
    state.job(lm, chosen[0].payload)
    return config, state, chosen


def _digit_model(tokenizer, chat):
    """A tiny random model that mostly answers digits and then stops, unequally across digits, so
    that listed answers carry a sizeable (not total) share of its mass and sampling errors show."""
    model = tiny_model(tokenizer, "llama", seed=1)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    bias = torch.full((head.out_features,), -8.0)
    bias[digits] = torch.tensor([0.5, 1.4, -0.2, 2.0, 1.1, 0.2, 0.9, -0.5, 1.8, 0.4])
    bias[chat.end_token_id] = -1.0
    marker = torch.zeros(head.in_features)
    marker[0] = 1.0
    with torch.no_grad():
        # A marker on the digit embeddings, read by the end token's head row: the answer ends
        # after a digit more often than anywhere else.
        model.get_input_embeddings().weight[digits] += 0.3 * marker
        biased.weight.copy_(head.weight)
        biased.weight[chat.end_token_id] += 1.0 * marker
        biased.bias.copy_(bias)
    model.lm_head = biased
    return model.eval()


# ---- exact figures -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_probabilities_equal_teacher_forced_sequence_probabilities(
    tokenizer, chat, tmp_path, arch
):
    model = tiny_model(tokenizer, arch, seed=3)
    lm = session(model, tokenizer, chat)
    for chunk_size in (1, 3, 4096):  # a trie cut into many packed passes, and one pass
        config, state, (digits, states) = prepared(
            lm, tmp_path, [DIGITS, STATES], samples=0, exact_chunk_size=chunk_size
        )
        for job_item in (digits, states):
            target, job = job_item.payload, state.job(lm, job_item.payload)
            record = run_item(lm, job_item, config, state, seed=0)
            assert list(record["exact_probs"]) == list(target.answers)
            brute = np.array(
                [
                    teacher_forced_logprob(
                        model,
                        job.prompt_ids,
                        tokenizer(a, add_special_tokens=False)["input_ids"] + [chat.end_token_id],
                    )
                    for a in target.answers
                ]
            )
            np.testing.assert_allclose(
                np.log(list(record["exact_probs"].values())), brute, rtol=0, atol=1e-5
            )
            mass = np.exp(brute).sum()
            target = target.probs
            assert record["exact_valid_mass"] == pytest.approx(mass, rel=1e-4)
            assert record["exact_tv"] == pytest.approx(
                0.5 * np.abs(np.exp(brute) / mass - target).sum(), abs=1e-5
            )
            assert record["exact_kl"] == pytest.approx(
                np.sum(target * (np.log(target) - brute + np.log(mass))), abs=1e-4
            )
            assert (
                record["samples"] == 0
                and record["sampled_valid_rate"] is None
                and record["valid_gap"] is None
            )


def test_exact_figures_of_known_distributions():
    target = np.array([0.5, 0.25, 0.25])
    perfect = exact_figures(np.log(target), target)
    assert perfect == pytest.approx(
        {"exact_valid_mass": 1.0, "exact_tv": 0.0, "exact_kl": 0.0}, abs=1e-12
    )
    # Half of the mass elsewhere: the valid mass says so; TV and KL compare the renormalized law.
    half = exact_figures(np.log(target / 2), target)
    assert half == pytest.approx(
        {"exact_valid_mass": 0.5, "exact_tv": 0.0, "exact_kl": 0.0}, abs=1e-12
    )
    swapped = exact_figures(np.log([0.25, 0.5, 0.25]) - 3.0, target)
    assert swapped["exact_tv"] == pytest.approx(0.25)
    assert swapped["exact_valid_mass"] == pytest.approx(math.exp(-3.0))
    assert swapped["exact_kl"] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    # Zero-weight answers count in the valid mass but not in the KL.
    zero = exact_figures(np.log([0.5, 0.3, 0.2]), np.array([0.5, 0.5, 0.0]))
    assert zero["exact_valid_mass"] == pytest.approx(1.0) and zero["exact_tv"] == pytest.approx(0.2)
    assert zero["exact_kl"] == pytest.approx(0.5 * math.log(0.5 / 0.3))
    # Underflowing probabilities still give a renormalized law.
    tiny = exact_figures(np.log(target) - 900.0, target)
    assert tiny["exact_valid_mass"] == 0.0 and tiny["exact_tv"] == pytest.approx(0.0, abs=1e-12)


# ---- sampling against the exact pass -----------------------------------------------------------


@pytest.fixture(scope="module")
def digit_run(tokenizer, chat, tmp_path_factory):
    """20000 generations of the digit model, matched to the list, with its exact figures."""
    lm = session(_digit_model(tokenizer, chat), tokenizer, chat)
    config, state, (item,) = prepared(
        lm, tmp_path_factory.mktemp("digits"), [DIGITS], samples=20000, max_new_tokens=4
    )
    return lm, item, state.job(lm, item.payload), run_item(lm, item, config, state, seed=11)


def _chi_square_p(record, probs):
    """p-value of the matched counts, then all other generations, against `probs` (same order)."""
    n = record["samples"]
    counts = np.array(
        list(record["sample_counts"].values()) + [n - sum(record["sample_counts"].values())],
        dtype=float,
    )
    expected = probs * n
    big = expected >= 5  # pool categories too rare for the chi-square approximation
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    return stats.chisquare(
        observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()
    ).pvalue


def test_sampled_frequencies_agree_with_exact_probabilities(digit_run):
    _, _, _, record = digit_run
    exact = np.array(list(record["exact_probs"].values()))
    assert (
        0.15 < record["exact_valid_mass"] < 0.9
    )  # listed answers carry a sizeable, not total, share
    expected = np.append(exact, 1 - exact.sum())
    assert (expected * 20000 >= 5).sum() >= 5
    assert _chi_square_p(record, expected) > 1e-3
    # The test has power: moving 0.01 between the two likeliest answers is rejected.
    wrong = expected.copy()
    top = np.argsort(exact)[-2:]
    wrong[top] += np.array([-0.01, 0.01])
    assert _chi_square_p(record, wrong) < 1e-4
    # This model writes listed answers only in their canonical tokens: no gap beyond noise.
    sd = math.sqrt(record["exact_valid_mass"] * (1 - record["exact_valid_mass"]) / 20000)
    assert abs(record["valid_gap"]) < 4 * sd
    assert (
        record["sampled_tv"] < 0.05 + record["exact_tv"]
        and record["sampled_tv"] > record["exact_tv"] - 0.05
    )


def test_sampled_tv_matches_the_exact_tv_of_the_renormalized_law(digit_run):
    _, _, _, record = digit_run
    counts = np.array(list(record["sample_counts"].values()), dtype=float)
    target = np.array(list(record["target"].values()))
    assert record["sampled_tv"] == pytest.approx(0.5 * np.abs(counts / counts.sum() - target).sum())
    assert record["sampled_valid_rate"] == pytest.approx(counts.sum() / 20000)
    assert record["valid_gap"] == pytest.approx(
        record["sampled_valid_rate"] - record["exact_valid_mass"]
    )
    assert sum(c for _, c in record["unmatched"]) <= 20000 - counts.sum()


def test_matching_normalizes_and_drops_cut_generations(digit_run):
    _, item, job, _ = digit_run  # answers 3, 8, 1, 10, 42
    texts = ["3", " 8 ", '"1"', "10\nmore", "42", "4 2", "3", "7", "99"]
    ended = [True] * 8 + [False]
    figures = sampled_figures(texts, ended, item.payload, job, case_insensitive=False)
    assert figures["sample_counts"] == {"3": 2, "8": 1, "1": 1, "10": 1, "42": 1}
    assert figures["sampled_valid_rate"] == pytest.approx(6 / 9)
    assert dict(figures["unmatched"]) == {"4 2": 1, "7": 1, "99 [cut at max_new_tokens]": 1}
    yes_no = Target.from_answers("p", ("Yes", "No"), (3.0, 7.0), "g")
    letters = categorical.PromptJob([], job.trie, job.layout, {"yes": 0, "no": 1})
    folded = sampled_figures(
        ["YES", "no", "No", "maybe"], [True] * 4, yes_no, letters, case_insensitive=True
    )
    assert folded["sample_counts"] == {"Yes": 1, "No": 2}
    assert folded["sampled_tv"] == pytest.approx(0.5 * (abs(1 / 3 - 0.3) + abs(2 / 3 - 0.7)))
    maybe = sampled_figures(["maybe"], [True], yes_no, letters, case_insensitive=True)
    assert maybe["sampled_tv"] is None


def test_preparation_refuses_what_cannot_be_measured(tokenizer, chat, tmp_path):
    lm = session(tiny_model(tokenizer, "llama"), tokenizer, chat)
    with pytest.raises(
        ValueError,
        match=re.escape("t.jsonl line 1: max_new_tokens=2 is shorter than the longest answer ("),
    ):
        prepared(lm, tmp_path, [STATES], max_new_tokens=2)
    prepared(
        lm, tmp_path, [STATES], max_new_tokens=2, samples=0
    )  # no sampling, no limit to respect
    cased = {"prompt": "Answer.", "targets": ["Yes", "yes", "No"]}
    prepared(lm, tmp_path, [cased])
    with pytest.raises(
        ValueError, match=re.escape("t.jsonl line 1: targets: 'Yes' and 'yes' cannot be told apart")
    ):
        prepared(lm, tmp_path, [cased], case_insensitive=True)
    with pytest.raises(
        ValueError,
        match=re.escape("line 1: targets: answer 'a<|im_end|>' contains the end-of-turn token"),
    ):
        prepared(lm, tmp_path, [{"prompt": "p", "targets": ["a<|im_end|>", "b"]}])


# ---- the benchmark through the runner ----------------------------------------------------------


def run_eval(model_dir, output, targets, adapters=(), *, plots=True, **settings):
    shared = EvalConfig(
        model=str(model_dir),
        adapters=[str(a) for a in adapters],
        output=str(output),
        progress=False,
        plots=plots,
    )
    config = Config(targets=[str(targets)], **{"samples": 30, "max_new_tokens": 4, **settings})
    return evaluate(shared, {"categorical": config})


@pytest.fixture(scope="module")
def run(model_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("categorical")
    targets = write_jsonl(out / "targets.jsonl", [DIGITS, LETTERS, {**STATES, "group": "states"}])
    return (
        out,
        targets,
        run_eval(model_dir, out / "eval", targets, [adapter_dir], max_new_tokens=12),
    )


def test_report_holds_the_documented_figures(run):
    out, _, report = run
    assert json.loads((out / "eval" / "report.json").read_text()) == report
    result = report["benchmarks"]["categorical"]
    assert list(result["checkpoints"]) == ["base", "soft-run"]
    records = result["items"]
    assert len(records) == 2 * 3
    for record in records:
        assert {
            "prompt",
            "exact_tv",
            "exact_valid_mass",
            "exact_probs",
            "exact_kl",
            "sampled_tv",
            "sampled_valid_rate",
        } <= set(record)
        assert 0 <= record["exact_tv"] <= 1 and 0 < record["exact_valid_mass"] <= 1
        assert record["exact_valid_mass"] == pytest.approx(sum(record["exact_probs"].values()))
        assert (
            record["samples"] == 30
            and record["sampled_valid_rate"] == sum(record["sample_counts"].values()) / 30
        )
    for name, summary in result["checkpoints"].items():
        assert {
            "mean_exact_tv",
            "mean_exact_valid_mass",
            "mean_sampled_tv",
            "mean_sampled_valid_rate",
        } <= set(summary)
        mine = [r for r in records if r["checkpoint"] == name]
        groups = {r["group"] for r in mine}
        by_group = [np.mean([r["exact_tv"] for r in mine if r["group"] == g]) for g in groups]
        assert summary["mean_exact_tv"] == pytest.approx(np.mean(by_group))
    # The adapter changes the model's answer probabilities.
    base = {r["prompt"]: r for r in records if r["checkpoint"] == "base"}
    assert all(
        r["exact_probs"] != base[r["prompt"]]["exact_probs"]
        for r in records
        if r["checkpoint"] == "soft-run"
    )
    markdown = (out / "eval" / "report.md").read_text()
    assert "## categorical" in markdown and "| figure | base | soft-run |" in markdown
    assert (
        f"| mean_exact_tv | {format_value(result['checkpoints']['base']['mean_exact_tv'], 4)} |"
        in markdown
    )
    plots = sorted(p.name for p in (out / "eval" / "plots").iterdir())
    assert plots == [
        "categorical_000_digits.png",
        "categorical_001_letters.png",
        "categorical_002_states.png",
    ]


def test_headline_table_shows_each_checkpoints_means(run):
    _, _, report = run
    table = headline_table(report, {"categorical": load_benchmark("categorical")})
    lines = table.splitlines()
    assert lines[0] == (
        "| checkpoint | categorical: mean exact TV | categorical: mean exact valid mass |"
    )
    for name, summary in report["benchmarks"]["categorical"]["checkpoints"].items():
        cells = [format_value(summary[k], 4) for k in ("mean_exact_tv", "mean_exact_valid_mass")]
        assert f"| {name} | {' | '.join(cells)} |" in lines


def test_rerun_uses_the_cache_and_seeds_are_common(run, model_dir, adapter_dir, monkeypatch):
    out, targets, report = run
    calls = []
    original = categorical.run_item
    monkeypatch.setattr(categorical, "run_item", lambda *a: calls.append(a[1].key) or original(*a))
    again = run_eval(
        model_dir, out / "eval", targets, [adapter_dir], max_new_tokens=12, plots=False
    )
    assert calls == [] and again["benchmarks"] == report["benchmarks"]
    # Selecting fewer prompts reuses the cache; a setting that changes results does not.
    run_eval(
        model_dir, out / "eval", targets, [adapter_dir], max_new_tokens=12, per_group=1, plots=False
    )
    assert calls == []
    run_eval(
        model_dir, out / "eval", targets, max_new_tokens=12, case_insensitive=True, plots=False
    )
    assert len(calls) == 3


def test_cli_runs_and_reports_bad_files_in_one_line(model_dir, tmp_path, monkeypatch, capsys):
    targets = write_jsonl(tmp_path / "t.jsonl", [LETTERS])
    code = cli_main(
        [
            "eval",
            "categorical",
            "--model",
            str(model_dir),
            "--targets",
            str(targets),
            "--samples",
            "3",
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["categorical"]["targets"] == [str(targets)]
    assert capsys.readouterr().out.splitlines()[0].endswith("report.md")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was raised")

    monkeypatch.setattr(runner, "open_backend", refuse)
    bad = write_jsonl(tmp_path / "bad.jsonl", [LETTERS, {"prompt": "q", "targets": ["x", "x"]}])
    code = cli_main(
        [
            "eval",
            "categorical",
            "--model",
            str(model_dir),
            "--targets",
            str(bad),
            "--output",
            str(tmp_path / "o2"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{bad} line 2: targets: 'x' appears twice (answers 1 and 2)" in err


def test_default_targets_are_the_shipped_heldout_set():
    chosen = items(Config())
    assert [i.payload for i in chosen] == load_targets("shipped:heldout")
    assert len(items(Config(per_group=1))) == len({i.group for i in chosen})


@pytest.mark.slow
def test_bench_script_quick_mode(model_dir, tmp_path):
    """benches/bench_categorical.py --quick on the tiny model writes the documented JSON."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "benches" / "bench_categorical.py"
    output = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--model",
            str(model_dir),
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    data = json.loads(output.read_text())
    assert (
        data["bench"] == "categorical" and data["mode"] == "quick" and data["machine"]["cores"] >= 1
    )
    assert [row["answers"] for row in data["sizes"]] == [10, 100]
    for row in data["sizes"]:
        assert row["internal_nodes"] < row["trie_nodes"] and row["samples"] == 100
        assert row["exact_s"] > 0 and row["sample_s"] > 0 and 0 <= row["sampled_valid_rate"] <= 1
        assert row["exact_over_sampled_1000"] == pytest.approx(
            row["exact_s"] / row["sample_s_per_1000"]
        )
    assert data["target_met"] == all(r["exact_over_sampled_1000"] <= 0.1 for r in data["sizes"])
