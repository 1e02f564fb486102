"""The MCQ answer-position benchmark (docs/benchmarks/mcq.md): its prompt, the balance figures
against hand-worked values, pooling over chunks, failures counted rather than raised, and a run
on a tiny local model."""

import hashlib
import json

import pytest
from tiny_models import CannedSession, tiny_model, tiny_tokenizer

from calibft.chat import ChatFormat
from calibft.eval.benchmarks import mcq
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate

PROMPT_SHA256 = "d600f216c4ad69f3956bf24828705e9a8d147777e8fca00e44e03918575a12df"


def session(texts):
    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer)
    return CannedSession(
        tiny_model(tokenizer), tokenizer, chat, [chat.end_token_id], texts=tuple(texts)
    )


def question(letter: str) -> str:
    return (
        f"Question: Which organ is number {letter}?\nA. Heart\nB. Liver\nC. Lung\nD. Kidney\n"
        f"Correct Answer: {letter}\nExplanation: By construction."
    )


def run_all(lm, config):
    """Every shard of `config` through run_item, as the runner would, then the summary."""
    shards = [shard for item in mcq.items(config) for shard in item.shards()]
    records = [mcq.run_item(lm, item, config, None, seed=i) for i, item in enumerate(shards)]
    return records, mcq.summarize(records, None)


def test_prompt_is_the_papers() -> None:
    assert len(mcq.PROMPT) == 953 and mcq.PROMPT.endswith("any particular option.\n")
    assert hashlib.sha256(mcq.PROMPT.encode()).hexdigest() == PROMPT_SHA256


def shards(config):
    return [shard for item in mcq.items(config) for shard in item.shards()]


def test_items_are_shards_a_larger_run_reuses() -> None:
    keys = [item.key for item in shards(mcq.Config(samples=250))]
    assert keys == [("chunk", 0, 100), ("chunk", 100, 100), ("chunk", 200, 50)]
    assert [item.key for item in shards(mcq.Config())][:2] == keys[:2]
    assert len(shards(mcq.Config())) == 10
    assert [(s.shard.start, s.shard.count) for s in shards(mcq.Config(samples=7))] == [(0, 7)]


@pytest.mark.parametrize(
    ("counts", "tv"),
    [
        ([1, 1, 1, 1], 0.0),
        ([8, 2, 0, 0], 0.55),
        ({"A": 0, "B": 0, "C": 0, "D": 5}, 0.75),
        ([0, 0, 0, 0], None),
    ],
)
def test_tv_from_uniform_hand_cases(counts, tv) -> None:
    assert mcq.tv_from_uniform(counts) == (pytest.approx(tv) if tv is not None else None)


def test_letter_figures_golden_values() -> None:
    even = mcq.letter_figures({"A": 1, "B": 1, "C": 1, "D": 1})
    assert (
        even["tv"] == 0.0
        and even["chi2_statistic"] == 0.0
        and even["chi2_p_value"] == pytest.approx(1.0)
    )
    skewed = mcq.letter_figures({"A": 8, "B": 2, "C": 0, "D": 0})
    assert skewed["tv"] == pytest.approx(0.55)
    assert skewed["max_abs_deviation"] == pytest.approx(0.55)
    # Expected 2.5 each: (5.5² + 0.5² + 2.5² + 2.5²) / 2.5 = 17.2 on 3 degrees of freedom.
    assert skewed["chi2_statistic"] == pytest.approx(17.2) and skewed["chi2_p_value"] < 0.05
    assert skewed["letter_frequencies"] == {"A": 0.8, "B": 0.2, "C": 0.0, "D": 0.0}
    none = mcq.letter_figures({"A": 0, "B": 0, "C": 0, "D": 0})
    assert none["tv"] is None and none["chi2_p_value"] is None and none["max_abs_deviation"] is None


def test_one_question_per_letter_gives_perfect_balance() -> None:
    lm = session([question(letter) for letter in "ABCD"])
    records, summary = run_all(lm, mcq.Config(samples=8))
    assert (summary["parse_rate"], summary["tv"], summary["generations"]) == (1.0, 0.0, 8)
    assert summary["letter_counts"] == {"A": 2, "B": 2, "C": 2, "D": 2}
    assert summary["unique_options_rate"] == 1.0 and summary["error_counts"] == {}
    assert (
        lm.calls[0]["ids"] == tuple(lm.chat.prompt_ids(mcq.PROMPT))
        and lm.calls[0]["max_new_tokens"] == 256
    )
    json.dumps(records, allow_nan=False)


def test_failures_are_counted_not_raised() -> None:
    texts = [
        "",
        question("B")[:40],
        "Sure! Here is a question about the heart.",
        "\x00\ufffd\x7f garbage",
        question("A"),
        "<think>I should write",
        question("E"),
    ]
    records, summary = run_all(session(texts), mcq.Config(samples=7))
    assert summary["parse_rate"] == pytest.approx(1 / 7)
    assert summary["letter_counts"] == {"A": 1, "B": 0, "C": 0, "D": 0} and summary[
        "tv"
    ] == pytest.approx(0.75)
    assert summary["valid_correct_answer_rate"] == pytest.approx(
        1 / 7
    )  # the truncated "B" lost its answer line
    assert summary["error_counts"]["empty_response"] == 2
    # An empty generation has that one error; the other four failures lack a valid letter.
    assert summary["error_counts"]["invalid_correct_answer"] == 4
    assert records[0]["examples"] == [t.strip() for t in texts[: mcq.EXAMPLES_PER_CHUNK]]


def test_pooling_over_chunks_matches_one_pool() -> None:
    lm = session([question("A"), question("A"), question("C"), "prose"])
    records, summary = run_all(lm, mcq.Config(samples=230))
    assert len(records) == 3 and summary["generations"] == 230
    parsed = [ok for r in records for ok in r["parseable"]]
    assert summary["parse_rate"] == sum(parsed) / 230
    assert sum(summary["letter_counts"].values()) == sum(parsed)


def test_end_to_end_on_a_tiny_model(model_dir, adapter_dir, tmp_path) -> None:
    """A random model writes no parseable question: parse rate 0 and TV null, never a crash."""
    shared = EvalConfig(
        model=str(model_dir), adapters=[str(adapter_dir)], output=str(tmp_path), progress=False
    )
    report = evaluate(shared, {"mcq": mcq.Config(samples=6, max_new_tokens=12)})
    for name in ("base", "soft-run"):
        summary = report["benchmarks"]["mcq"]["checkpoints"][name]
        assert summary["generations"] == 6 and summary["parse_rate"] == 0.0
        assert summary["tv"] is None and summary["chi2_statistic"] is None
        assert summary["letter_counts"] == {"A": 0, "B": 0, "C": 0, "D": 0}
        errors = summary["error_counts"]  # each generation fails one way or the other
        assert errors.get("invalid_correct_answer", 0) + errors.get("empty_response", 0) == 6
    items = report["benchmarks"]["mcq"]["items"]
    assert [len(i["examples"]) for i in items] == [mcq.EXAMPLES_PER_CHUNK] * 2
    assert (tmp_path / "plots" / "mcq_letters.png").is_file()
    markdown = (tmp_path / "report.md").read_text()
    assert "| parse_rate | 0 | 0 |" in markdown
    assert (
        "| checkpoint | mcq: parse rate | mcq: TV from uniform |\n|---|---|---|\n| base | 0 | n/a |"
        in markdown
    )
