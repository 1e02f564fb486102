"""The `retention` benchmark: gp-IRT against an independent re-derivation, the safe reader of the
IRT file, the scoring rules with a stub LM, the GSM8K extractors, the loaders, and runs on the
tiny model through `evaluate` and the CLI (one slow run on SmolLM2)."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from tiny_models import tiny_tokenizer

from calibft.chat import ChatFormat
from calibft.cli import main as cli_main
from calibft.eval import load_benchmark
from calibft.eval.benchmarks import retention
from calibft.eval.benchmarks.retention.data import DATASETS
from calibft.eval.benchmarks.retention.irt import fit_ability, gp_irt, load_irt_file
from calibft.eval.config import EvalConfig
from calibft.eval.report import headline_table
from calibft.eval.runner import evaluate

# --- hand-made rows in the exact schemas ----------------------------------------------------

ROWS = {
    "tinyMMLU": [
        {
            "question": "What is 2 + 2?",
            "subject": "elementary_mathematics",
            "choices": ["3", "4", "5", "22"],
            "answer": 1,
            "input_formatted": "The following are multiple choice questions (with answers) about "
            "elementary mathematics.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:",
        },
        {
            "question": "Which is a prime?",
            "subject": "elementary_mathematics",
            "choices": ["4", "6", "7"],
            "answer": 2,
            "input_formatted": "Which is a prime?\nA. 4\nB. 6\nC. 7\nAnswer:",
        },
    ],
    "tinyHellaswag": [
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow.",
            "ctx_b": "then",
            "ctx": "Then, the man writes over the snow. then",
            "endings": [
                ", the man adds wax to the windshield.",
                "he stops [title] He waves. [step] Then he goes.",
                ", a woman is seen.",
                ", the man continues removing the snow.",
            ],
            "source_id": "activitynet~v_-1IBHYS3L-Y",
            "split": "val",
            "split_type": "indomain",
            "label": "3",
            "input_formatted": "Removing ice from car: Then, the man writes over the snow. then",
        },
        {
            "ind": 9,
            "activity_label": "Baking cookies",
            "ctx_a": "A woman mixes flour.",
            "ctx_b": "she",
            "ctx": "A woman mixes flour. she",
            "endings": ["bakes.", "sings.", "leaves.", "sleeps."],
            "source_id": "wikihow~1",
            "split": "val",
            "split_type": "zeroshot",
            "label": "0",
            "input_formatted": "Baking cookies: A woman mixes flour. she",
        },
    ],
    "tinyTruthfulQA": [
        {
            "question": "What is the capital of France?",
            "mc1_targets": {"choices": ["Paris", "Lyon"], "labels": [1, 0]},
            "mc2_targets": {"choices": ["Paris", "It is Paris", "Lyon"], "labels": [1, 1, 0]},
            "input_formatted": "Q: What is the capital of France?\nA:",
        },
        {
            "question": "Can pigs fly?",
            "mc1_targets": {"choices": ["No", "Yes"], "labels": [1, 0]},
            "mc2_targets": {"choices": ["Yes", "No"], "labels": [0, 1]},
            "input_formatted": "Q: Can pigs fly?\nA:",
        },
    ],
    "tinyWinogrande": [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the "
            "harder cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "1",
            "input_formatted": "Sarah was a much better surgeon than Maria so Sarah",
        },
        {
            "sentence": "The trophy does not fit in the suitcase because the _ is too small.",
            "option1": "trophy",
            "option2": "suitcase",
            "answer": "2",
            "input_formatted": "The trophy does not fit in the suitcase because the suitcase",
        },
    ],
    "tinyGSM8k": [
        {
            "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
            "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n"
            "In all 48+24 = <<48+24=72>>72.\n#### 72",
            "input_formatted": "Question: Natalia sold 48 clips in April and half as many in May. "
            "How many in all?\nAnswer:",
        },
        {
            "question": "A shirt costs $1,200. What do two cost?",
            "answer": "2 * 1,200 = 2,400\n#### 2,400",
            "input_formatted": "Question: A shirt costs $1,200. What do two cost?\nAnswer:",
        },
    ],
}


def write_data(directory: Path, rows_per_dataset: int = 100) -> Path:
    """Each dataset as <name>.jsonl with 100 rows: the hand-made rows repeated in order."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in ROWS.items():
        lines = [json.dumps(rows[i % len(rows)]) for i in range(rows_per_dataset)]
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


# --- a synthetic IRT parameter file (the upstream structure, small) --------------------------


def synthetic_irt(seed: int = 0) -> dict:
    """An `lb`-like bundle with two scenarios over a 300-item pool (alpha: 120 items in one
    subscenario; beta: 180 items in three), D = 2, 100 anchors each; and an `mmlu`-like bundle
    with one scenario of 250 items in two subscenarios, 100 anchors."""
    rng = np.random.default_rng(seed)

    def bundle(scenarios: dict[str, list[list[int]]], lambdas: dict[str, float], pool: int) -> dict:
        positions = {s: sorted(i for sub in subs for i in sub) for s, subs in scenarios.items()}
        seen = np.concatenate(
            [rng.choice(positions[s], size=100, replace=False) for s in scenarios]
        )
        weights = {s: rng.dirichlet(np.ones(100)) for s in scenarios}
        return {
            "seen_examples": seen.astype(np.int64).tolist(),
            "examples_weights": weights,
            "irt_parameters": {
                "A": rng.uniform(0.3, 2.0, size=(1, 2, pool)),
                "B": rng.normal(0, 1, size=(1, 2, pool)),
            },
            "optimal_lambdas": {s: np.float64(v) for s, v in lambdas.items()},
            "scenarios_position": {s: np.asarray(p, dtype=np.int64) for s, p in positions.items()},
            "subscenarios_position": {
                s: {f"sub{k}": list(sub) for k, sub in enumerate(subs)}
                for s, subs in scenarios.items()
            },
        }

    lb = bundle(
        {
            "alpha": [list(range(120))],
            "beta": [list(range(120, 170)), list(range(170, 230)), list(range(230, 300))],
        },
        {"alpha": 0.3, "beta": 0.6},
        300,
    )
    mmlu = bundle({"mmlu": [list(range(100)), list(range(100, 250))]}, {"mmlu": 0.45}, 250)
    return {"lb": lb, "mmlu": mmlu, "helm_lite": {}, "alpaca": {}}


def reference_estimates(y, params, bundle, scenario):
    """Straight from the definitions, item by item, with its own optimizer (Nelder-Mead)."""
    part = params[bundle]
    names = list(part["scenarios_position"])
    pool = 1 + max(max(int(i) for i in v) for v in part["scenarios_position"].values())
    weight = [1.0] * pool
    for s, items in part["scenarios_position"].items():
        subs = part["subscenarios_position"][s]
        for members in subs.values():
            for i in members:
                weight[i] = len(items) / (len(subs) * len(members))
    seen = [int(i) for i in part["seen_examples"]]
    if len(seen) != 100:
        seen = seen[100 * names.index(scenario) : 100 * names.index(scenario) + 100]
    r = [0.0] * pool
    for j, i in enumerate(seen):
        r[i] = y[j]
    a, b = part["irt_parameters"]["A"][0], part["irt_parameters"]["B"][0]

    def prob(theta, i):
        z = sum(min(30.0, max(-30.0, a[d, i] * theta[d] - b[d, i])) for d in range(len(theta)))
        return 1 / (1 + math.exp(-z))

    def nll(theta):
        return -sum(
            r[i] * math.log(prob(theta, i) + 1e-10)
            + (1 - r[i]) * math.log(1 - prob(theta, i) + 1e-10)
            for i in seen
        )

    theta = minimize(
        nll,
        np.zeros(a.shape[0]),
        method="Nelder-Mead",
        options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000},
    ).x
    members = [int(i) for i in part["scenarios_position"][scenario]]
    seen_here = [i for i in seen if i in members]
    unseen_here = [i for i in members if i not in seen]
    irt = sum(e * r[i] for e, i in zip(part["examples_weights"][scenario], seen_here))
    lam = 100 / len(members)
    pirt = lam * sum(weight[i] * r[i] for i in seen_here) / len(seen_here)
    if unseen_here:
        pirt += (1 - lam) * sum(weight[i] * prob(theta, i) for i in unseen_here) / len(unseen_here)
    best = float(part["optimal_lambdas"][scenario])
    return theta, {"irt": irt, "pirt": pirt, "gpirt": best * irt + (1 - best) * pirt}


@pytest.fixture(scope="module")
def irt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("irt") / "tinyBenchmarks.pkl"
    path.write_bytes(pickle.dumps(synthetic_irt(), protocol=4))  # the upstream file's protocol
    return path


@pytest.mark.parametrize("bundle,scenario", [("lb", "alpha"), ("lb", "beta"), ("mmlu", "mmlu")])
def test_estimator_matches_an_independent_rederivation(irt_file, bundle, scenario) -> None:
    params = load_irt_file(irt_file)
    y = (np.random.default_rng(5).random(100) < 0.6).astype(float).tolist()
    got = gp_irt(y, params, bundle=bundle, scenario=scenario)
    _, expected = reference_estimates(y, params, bundle, scenario)
    assert set(got) == {"irt", "pirt", "gpirt"}
    for key in got:
        assert got[key] == pytest.approx(expected[key], abs=2e-5), key


def planted_responses(params, bundle, scenario, theta, bernoulli_seed=None):
    part = params[bundle]
    names = list(part["scenarios_position"])
    seen = np.asarray(part["seen_examples"])
    if len(seen) != 100:
        seen = seen[100 * names.index(scenario) : 100 * names.index(scenario) + 100]
    a, b = part["irt_parameters"]["A"], part["irt_parameters"]["B"]
    p = 1 / (
        1
        + np.exp(-np.clip(a[0, :, seen].T * theta[:, None] - b[0, :, seen].T, -30, 30).sum(axis=0))
    )
    if bernoulli_seed is None:
        return p, seen
    return (np.random.default_rng(bernoulli_seed).random(p.shape) < p).astype(float), seen


def test_ability_is_recovered(irt_file) -> None:
    params = load_irt_file(irt_file)
    part = params["lb"]
    a, b = np.asarray(part["irt_parameters"]["A"]), np.asarray(part["irt_parameters"]["B"])
    planted = np.array([0.8, -0.5])
    # Continuous responses equal to the planted probabilities: the likelihood peaks exactly there.
    p, seen = planted_responses(params, "lb", "beta", planted)
    responses = np.zeros(300)
    responses[seen] = p
    assert fit_ability(responses, seen, a, b) == pytest.approx(planted, abs=1e-3)
    # With 0/1 answers drawn from them, the fit's total ability lands near the planted one.
    draws, _ = planted_responses(params, "lb", "beta", planted, bernoulli_seed=3)
    responses[seen] = draws
    assert fit_ability(responses, seen, a, b).sum() == pytest.approx(planted.sum(), abs=0.5)


def test_pirt_of_planted_ability_predicts_the_unseen_items(irt_file) -> None:
    params = load_irt_file(irt_file)
    p, _ = planted_responses(params, "mmlu", "mmlu", np.array([0.3, 0.1]))
    got = gp_irt(p.tolist(), params, bundle="mmlu", scenario="anything")  # one-scenario bundle
    _, expected = reference_estimates(p.tolist(), params, "mmlu", "mmlu")
    assert got["pirt"] == pytest.approx(expected["pirt"], abs=1e-5)


def test_edge_responses_and_lengths(irt_file) -> None:
    params = load_irt_file(irt_file)
    ones = gp_irt([1.0] * 100, params, bundle="lb", scenario="beta")
    zeros = gp_irt([0.0] * 100, params, bundle="lb", scenario="beta")
    assert all(math.isfinite(v) for v in [*ones.values(), *zeros.values()])
    assert ones["irt"] == pytest.approx(1.0) and zeros["irt"] == 0.0  # the anchor weights sum to 1
    assert zeros["pirt"] == pytest.approx(0.0, abs=1e-3) and ones["pirt"] > 0.9
    with pytest.raises(ValueError, match="exactly 100"):
        gp_irt([1.0] * 99, params, bundle="lb", scenario="beta")
    with pytest.raises(ValueError, match="no scenario 'gamma'"):
        gp_irt([1.0] * 100, params, bundle="lb", scenario="gamma")


def test_a_scenario_made_only_of_anchors_is_its_observed_part() -> None:
    params = synthetic_irt()
    part = params["mmlu"]
    kept = [int(i) for i in part["seen_examples"]]
    part["scenarios_position"] = {"mmlu": np.asarray(kept)}
    part["subscenarios_position"] = {"mmlu": {"all": kept}}
    y = [float(i % 2) for i in range(100)]
    got = gp_irt(y, params, bundle="mmlu", scenario="mmlu")
    assert got["pirt"] == pytest.approx(np.mean(y))  # lambda = 1 and balance weights of 1: no NaN
    assert got["gpirt"] == pytest.approx(0.45 * got["irt"] + 0.55 * got["pirt"])


# --- the restricted unpickler ---------------------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_carrying_a_callable_is_refused_without_running_it(tmp_path, protocol) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(
        pickle.dumps({"lb": {"seen_examples": _RunsACommand(marker)}}, protocol=protocol)
    )
    with pytest.raises(ValueError, match=r"refused: it names (posix|nt)\.system"):
        load_irt_file(path)
    assert not marker.exists()


def test_other_globals_and_junk_are_refused(tmp_path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(ValueError, match="builtins.eval"):
        load_irt_file(path)
    path.write_bytes(pickle.dumps(np.array([1, None, print], dtype=object)))
    with pytest.raises(ValueError, match="builtins.print"):
        load_irt_file(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_irt_file(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="holds a list"):
        load_irt_file(path)
    with pytest.raises(
        ValueError, match="cannot read the IRT file .*download https://raw.githubusercontent"
    ):
        load_irt_file(tmp_path / "absent.pkl")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_arrays_and_scalars_load_under_every_protocol(tmp_path, protocol) -> None:
    data = {
        "a": np.arange(6.0).reshape(1, 2, 3),
        "i": [np.int64(3), 4],
        "f": np.float64(0.25),
        "t": (1, "x"),
        "b": np.array([True, False]),
        "s": {"k": np.float32(1.5)},
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_irt_file(path)
    np.testing.assert_array_equal(loaded["a"], data["a"])
    assert loaded["i"] == [3, 4] and loaded["f"] == 0.25 and loaded["t"] == (1, "x")
    assert loaded["s"]["k"] == np.float32(1.5) and loaded["b"].tolist() == [True, False]


def test_numpy_1_module_names_load_without_touching_numpy_core(tmp_path, recwarn) -> None:
    # The upstream file was written under numpy 1, whose arrays pickle as numpy.core.* globals.
    data = pickle.dumps({"A": np.ones((1, 2, 3)), "l": np.float64(0.5)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    loaded = load_irt_file(path)
    assert loaded["A"].shape == (1, 2, 3) and loaded["l"] == 0.5
    assert not [w for w in recwarn if "numpy.core" in str(w.message)]


def _broken(change):
    params = synthetic_irt()
    change(params)
    return params


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: p.pop("lb"), "has no bundle 'lb'"),
        (lambda p: p["lb"].pop("optimal_lambdas"), "bundle 'lb' lacks optimal_lambdas"),
        (
            lambda p: p["lb"].update(examples_weights=[1, 2]),
            "examples_weights is a list, not a dict",
        ),
        (
            lambda p: p["lb"]["irt_parameters"].update(A=np.ones((2, 3))),
            r"A and B of one shape \(1, D, N\)",
        ),
        (lambda p: p["lb"].update(seen_examples=list(range(150))), "150 anchor items"),
        (
            lambda p: p["lb"]["examples_weights"].update(beta=np.ones(99)),
            "99 anchor weights for 100 anchor items",
        ),
        (
            lambda p: p["lb"]["irt_parameters"].update(
                A=np.ones((1, 2, 10)), B=np.ones((1, 2, 10))
            ),
            "parameters for 10 items",
        ),
    ],
)
def test_irt_files_of_another_structure_are_named(tmp_path, change, message) -> None:
    from calibft.eval.benchmarks.retention.irt import check_irt

    with pytest.raises(ValueError, match=f"IRT file '.*wrong.pkl'.*{message}"):
        check_irt(_broken(change), {"lb": ["alpha", "beta"]}, tmp_path / "wrong.pkl")


# --- scoring rules with a stub LM -----------------------------------------------------------


class StubLM:
    """The `LM` members the scoring uses: the tiny ChatML tokenizer for prompts, and
    log-likelihoods looked up by (decoded context tail, decoded continuation)."""

    def __init__(self, table) -> None:
        self.tokenizer = tiny_tokenizer()
        self.chat = ChatFormat.from_tokenizer(self.tokenizer)
        self.table = table  # (continuation text, context text or None) -> log-likelihood
        self.requests: list[tuple[str, str]] = []

    def encode(self, text):
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def loglikelihood_requests(self, requests):
        out = []
        for context, continuation in requests:
            context_text = self.tokenizer.decode(context)
            text = self.tokenizer.decode(continuation)
            self.requests.append((context_text, text))
            matches = [
                v
                for (c, ctx), v in self.table.items()
                if c == text and (ctx is None or ctx in context_text)
            ]
            assert len(matches) == 1, (text, context_text)
            out.append(matches[0])
        return out


def test_delimiter_rule() -> None:
    assert retention.with_delimiter("Answer:", "A") == " A"
    assert retention.with_delimiter("Answer: ", "A") == "A"
    assert retention.with_delimiter("Answer:\n", "A") == "A"
    assert retention.with_delimiter("Answer:\t", "A") == "A"
    assert retention.with_delimiter("Answer:", " A") == " A"


def test_mmlu_scores_letters_after_the_rendered_prompt() -> None:
    row = ROWS["tinyMMLU"][0]
    lm = StubLM({(" A", None): -3.0, (" B", None): -1.0, (" C", None): -2.0, (" D", None): -4.0})
    record = retention.score_mmlu(lm, row)
    assert [c for _, c in lm.requests] == [" A", " B", " C", " D"]
    assert all(ctx == lm.chat.render(row["input_formatted"]) for ctx, _ in lm.requests)
    assert record["score"] == 1.0 and record["logprobs"] == [-3.0, -1.0, -2.0, -4.0]
    lm = StubLM({(" A", None): -0.5, (" B", None): -1.0, (" C", None): -2.0, (" D", None): -4.0})
    assert retention.score_mmlu(lm, row)["score"] == 0.0


def test_hellaswag_cleans_endings_and_normalizes_by_length() -> None:
    assert (
        retention.hellaswag_ending(" Wash it [title] Rinse it. [step] Dry. ")
        == "Wash it. Rinse it. Dry."
    )
    assert (
        retention.hellaswag_ending("[title] He stops.") == " He stops."
    )  # strip first: no " [title]" left
    # Brackets removed shortest-first; double spaces replaced in one pass (three spaces leave two).
    assert retention.hellaswag_ending("a [x]  b [y] c [z]]") == "a  b c ]"
    row = ROWS["tinyHellaswag"][0]
    endings = [retention.hellaswag_ending(e) for e in row["endings"]]
    # Raw sums favour the short ending 2; per character, ending 3 (the label) wins.
    sums = {0: -40.0, 1: -60.0, 2: -9.0, 3: -10.0}
    lm = StubLM({(" " + e, None): sums[i] for i, e in enumerate(endings)})
    record = retention.score_hellaswag(lm, row)
    per_char = [sums[i] / len(e) for i, e in enumerate(endings)]
    assert int(np.argmax(per_char)) == 3 and int(np.argmax(list(sums.values()))) == 2
    assert record["score"] == 1.0 and record["raw_correct"] == 0.0


def test_truthfulqa_mc2_is_the_true_choices_softmax_mass() -> None:
    row = ROWS["tinyTruthfulQA"][1]  # labels [0, 1]: the true choice is second
    lm = StubLM({(" Yes", None): -1.0, (" No", None): -2.0})
    record = retention.score_truthfulqa(lm, row)
    assert record["score"] == pytest.approx(math.exp(-2) / (math.exp(-1) + math.exp(-2)))
    assert record["raw_correct"] == 0.0
    row = ROWS["tinyTruthfulQA"][0]
    lm = StubLM({(" Paris", None): -1.0, (" It is Paris", None): -3.0, (" Lyon", None): -2.0})
    record = retention.score_truthfulqa(lm, row)
    total = math.exp(-1) + math.exp(-3) + math.exp(-2)
    assert record["score"] == pytest.approx((math.exp(-1) + math.exp(-3)) / total)
    assert record["raw_correct"] == 1.0


def test_winogrande_scores_the_shared_tail_after_each_option() -> None:
    row = ROWS["tinyWinogrande"][0]
    tail = " always got the harder cases."
    lm = StubLM({(tail, "Maria so Sarah"): -5.0, (tail, "Maria so Maria"): -7.0})
    record = retention.score_winogrande(lm, row)
    contexts = [ctx for ctx, _ in lm.requests]
    prefix = "Sarah was a much better surgeon than Maria so "
    assert contexts == [lm.chat.render(prefix + "Sarah"), lm.chat.render(prefix + "Maria")]
    assert record["score"] == 1.0 and record["logprobs"] == [-5.0, -7.0]
    # The longer option is tried first when one option ends the other.
    contexts, continuation = retention.winogrande_contexts(
        {
            "input_formatted": "I saw the cat",
            "option1": "cat",
            "option2": "the cat",
            "sentence": "I saw _ run.",
        }
    )
    assert contexts == ["I saw cat", "I saw the cat"] and continuation == " run."


@pytest.mark.parametrize("dataset", list(ROWS))
def test_prompt_tokens_are_a_prefix_of_prompt_plus_continuation(dataset) -> None:
    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer)
    for row in ROWS[dataset]:
        pairs = {
            "tinyMMLU": lambda r: [(r["input_formatted"], "A")],
            "tinyHellaswag": lambda r: [
                (r["input_formatted"], " " + retention.hellaswag_ending(e)) for e in r["endings"]
            ],
            "tinyTruthfulQA": lambda r: [
                (r["input_formatted"], " " + c) for c in r["mc2_targets"]["choices"]
            ],
            "tinyWinogrande": lambda r: [
                (c, retention.winogrande_contexts(r)[1])
                for c in retention.winogrande_contexts(r)[0]
            ],
            "tinyGSM8k": lambda r: [],
        }[dataset](row)
        for text, continuation in pairs:
            prompt = chat.render(text)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full = tokenizer(
                prompt + retention.with_delimiter(text, continuation), add_special_tokens=False
            )["input_ids"]
            assert full[: len(ids)] == ids and len(full) > len(ids)


# --- GSM8K ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,strict,flexible",
    [
        ("work\n#### 1,234.00", "1234", "1234"),
        ("no marker, the answer is 42", None, "42"),
        ("first 10 then final 12.50", None, "12.5"),
        ("#### 3 apples and 4 pears", None, "4"),
        ("#### -7\nthen 9 more", "-7", "9"),
        ("####   $2,400.", "2400", "2400"),
        ("#### five", None, None),
        ("pay 1,000,000 or 0.50", None, "0.5"),
    ],
)
def test_gsm8k_extractors(text, strict, flexible) -> None:
    assert retention.extract_gsm8k(text, "strict") == strict
    assert retention.extract_gsm8k(text, "flexible") == flexible


def test_gsm8k_gold_and_response_cleaning() -> None:
    assert retention.gsm8k_gold(ROWS["tinyGSM8k"][1]["answer"]) == "2400"
    assert retention.gsm8k_gold("x #### 1 #### 2.0") == "2"
    assert retention.normalize_number("-0") == "0" and retention.normalize_number("abc") is None
    text = "<think>hmm 99</think> So 5 + 3 = 8.\n#### 8\n\nQuestion: next one 77<|im_end|>"
    assert retention.clean_response(text) == "So 5 + 3 = 8.\n#### 8"
    with pytest.raises(ValueError, match="strict"):
        retention.extract_gsm8k("1", "loose")


class CannedLM(StubLM):
    """Greedy 'generation' returns a fixed text."""

    def __init__(self, text: str) -> None:
        super().__init__({})
        self.text = text

    def greedy(self, ids, max_new_tokens):
        assert (
            ids == self.chat.prompt_ids(ROWS["tinyGSM8k"][0]["input_formatted"])
            and max_new_tokens == 256
        )
        return [0]

    def decode(self, ids, *, special=True):
        return self.text


def test_gsm8k_record() -> None:
    record = retention.score_gsm8k(
        CannedLM("48 + 24 = 72 clips.\n#### 72</s>Question: x 5"), ROWS["tinyGSM8k"][0], 256
    )
    assert record["gold"] == "72" and record["response"] == "48 + 24 = 72 clips.\n#### 72"
    assert (record["strict_correct"], record["flexible_correct"], record["strict_failed"]) == (
        1.0,
        1.0,
        0.0,
    )
    record = retention.score_gsm8k(CannedLM("It is 72 clips, or 73"), ROWS["tinyGSM8k"][0], 256)
    assert (record["strict_correct"], record["strict_failed"], record["flexible_correct"]) == (
        0.0,
        1.0,
        0.0,
    )


# --- loaders -----------------------------------------------------------------------------------


def test_local_files_in_each_schema_load_in_order(tmp_path) -> None:
    data = write_data(tmp_path)
    items = retention.items(retention.Config(data=str(data)))
    counts = {}
    for item in items:
        counts[item.key[0]] = counts.get(item.key[0], 0) + 1
        name, index, row = item.payload.dataset, item.payload.index, item.payload.row
        assert row == ROWS[name][index % 2] and item.key[:2] == (name, index)
    assert counts == dict.fromkeys(ROWS, 100)
    # limit keeps the first rows; their keys do not change.
    limited = retention.items(
        retention.Config(data=str(data), limit=2, tasks=["tiny_gsm8k_flexible"])
    )
    assert [i.key for i in limited] == [i.key for i in items if i.key[0] == "tinyGSM8k"][:2]


def _rewrite(directory: Path, name: str, change) -> None:
    rows = [json.loads(line) for line in (directory / f"{name}.jsonl").read_text().splitlines()]
    rows = change(rows)
    (directory / f"{name}.jsonl").write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    )


def _set(rows, index, **fields):
    rows[index] = {**copy.deepcopy(rows[index]), **fields}
    return rows


@pytest.mark.parametrize(
    "name,change,message",
    [
        (
            "tinyMMLU",
            lambda rows: rows[:99],
            r"tinyMMLU\.jsonl: 99 rows; a tinyBenchmarks dataset has exactly 100",
        ),
        (
            "tinyMMLU",
            lambda rows: _set(rows, 3, extra=1),
            r"tinyMMLU\.jsonl: row 3 has fields .*'extra'",
        ),
        ("tinyMMLU", lambda rows: _set(rows, 4, answer=7), r"row 4 answer 7 is not a choice index"),
        (
            "tinyMMLU",
            lambda rows: _set(rows, 5, input_formatted=" "),
            r"row 5 has no input_formatted text",
        ),
        (
            "tinyHellaswag",
            lambda rows: _set(rows, 0, label="x"),
            r"tinyHellaswag\.jsonl: row 0 label 'x'",
        ),
        (
            "tinyTruthfulQA",
            lambda rows: _set(rows, 1, mc2_targets={"choices": ["a"], "labels": [0]}),
            r"row 1 has no true mc2 choice",
        ),
        (
            "tinyWinogrande",
            lambda rows: _set(rows, 2, input_formatted="ends elsewhere"),
            r"ending in neither option",
        ),
        (
            "tinyGSM8k",
            lambda rows: _set(rows, 6, answer="no marker"),
            r"tinyGSM8k\.jsonl: row 6 has no number",
        ),
        (
            "tinyGSM8k",
            lambda rows: rows[:3] + ["{broken"] + rows[4:],
            r"tinyGSM8k\.jsonl: line 4 is not JSON",
        ),
    ],
)
def test_bad_datasets_are_one_line_naming_the_file(tmp_path, name, change, message) -> None:
    data = write_data(tmp_path)
    _rewrite(data, name, change)
    with pytest.raises(ValueError, match=message):
        retention.items(retention.Config(data=str(data)))


def test_missing_and_empty_data_directories(tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        retention.items(retention.Config(data=str(tmp_path / "absent")))
    with pytest.raises(
        ValueError, match=r"tinyMMLU\.jsonl: missing \(the data directory holds no \.jsonl file\)"
    ):
        retention.items(retention.Config(data=str(tmp_path)))


def test_hub_rows_through_datasets(monkeypatch) -> None:
    asked = []

    def load_dataset(hub_id, config, split):
        asked.append((hub_id, config, split))
        name = hub_id.split("/")[1]
        return [ROWS[name][i % 2] for i in range(100)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items = retention.items(retention.Config())
    assert len(items) == 500
    assert asked == [(f"tinyBenchmarks/{d.name}", d.config, d.split) for d in DATASETS.values()]
    assert asked[0] == ("tinyBenchmarks/tinyMMLU", "all", "test")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        ValueError, match=r"tinyBenchmarks/tinyMMLU: cannot load from the hub .*--data DIR"
    ):
        retention.items(retention.Config())
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(
        ValueError, match=r"pip install calibft\[retention\], or give local files with --data DIR"
    ):
        retention.items(retention.Config())


# --- end to end on the tiny model ------------------------------------------------------------


def test_evaluate_two_rows_per_task_with_an_adapter(model_dir, adapter_dir, tmp_path) -> None:
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    shared = EvalConfig(
        model=str(model_dir), adapters=[str(adapter_dir)], output=str(out), progress=False
    )
    report = evaluate(
        shared, {"retention": retention.Config(data=str(data), limit=2, max_new_tokens=12)}
    )
    result = report["benchmarks"]["retention"]
    for name, summary in result["checkpoints"].items():
        records = [r for r in result["items"] if r["checkpoint"] == name]
        for task in retention.TASKS:
            scores = retention.task_scores(records, task)
            assert len(scores) == 2 and summary[f"{task}_items"] == 2
            assert summary[f"{task}_accuracy"] == pytest.approx(np.mean(scores))
            # Fewer than 100 rows, and no IRT file: never a guessed estimate.
            assert summary[f"{task}_gpirt"] is None and summary[f"{task}_irt"] is None
        assert summary["mean_gpirt"] is None and summary["irt_file"] is None
        assert summary["mean_accuracy"] == pytest.approx(
            np.mean([summary[f"{t}_accuracy"] for t in retention.TASKS])
        )
        assert summary["mean_mc_accuracy"] == pytest.approx(
            np.mean([summary[f"{t}_accuracy"] for t in retention.MC_TASKS])
        )
        for record in records:
            if record.get("dataset") == "tinyGSM8k":
                assert record["strict_correct"] == float(
                    retention.extract_gsm8k(record["response"], "strict") == record["gold"]
                )
            elif "dataset" in record:
                assert (
                    len(record["logprobs"])
                    == {
                        "tinyMMLU": len(ROWS["tinyMMLU"][record["row"]]["choices"]),
                        "tinyHellaswag": 4,
                        "tinyWinogrande": 2,
                        "tinyTruthfulQA": len(
                            ROWS["tinyTruthfulQA"][record["row"]]["mc2_targets"]["choices"]
                        ),
                    }[record["dataset"]]
                )
                assert all(lp < 0 for lp in record["logprobs"])
    base = [
        r for r in result["items"] if r["checkpoint"] == "base" and r.get("dataset") == "tinyMMLU"
    ]
    adapted = [
        r
        for r in result["items"]
        if r["checkpoint"] == "soft-run" and r.get("dataset") == "tinyMMLU"
    ]
    assert base[0]["logprobs"] != adapted[0]["logprobs"]  # the adapter was applied
    assert (out / "plots/retention_tasks.png").is_file()
    markdown = (out / "report.md").read_text()
    assert (
        "| tiny_gsm8k_strict_accuracy |" in markdown
        and "#### raw-argmax accuracy by group" in markdown
    )
    table = headline_table(report, {"retention": load_benchmark("retention")})
    assert table.splitlines()[0] == (
        "| checkpoint | retention: aggregate gp-IRT | retention: mean accuracy "
        "| retention: GSM8K strict |"
    )
    assert table.splitlines()[2].startswith("| base | n/a | ")


def test_loglikelihood_requests_match_full_forward_passes(model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from calibft.lm.score import request_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    requests = [
        ([5, 6, 7, 8], [9, 10]),
        ([5, 6, 7, 11, 12], [9]),
        ([5, 6, 7], [13, 14, 15]),
        ([20, 21], [22]),
    ]
    got = request_logprobs(model, requests, batch_size=2)
    for (context, continuation), value in zip(requests, got, strict=True):
        ids = context + continuation
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))
        assert value == pytest.approx(expected, abs=1e-4)


def test_gp_irt_through_the_runner_and_a_new_irt_file_rescoring_nothing(
    model_dir, irt_file, tmp_path
) -> None:
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    shared = EvalConfig(model=str(model_dir), output=str(out), progress=False, plots=False)
    config = retention.Config(data=str(data), tasks=["tiny_mmlu"])
    report = evaluate(shared, {"retention": config})
    summary = report["benchmarks"]["retention"]["checkpoints"]["base"]
    assert summary["tiny_mmlu_gpirt"] is None
    config.irt_file = str(irt_file)
    cache = out / "cache/retention/base"
    before = {p.name for p in cache.glob("*.json")}
    report = evaluate(shared, {"retention": config})
    assert {p.name for p in cache.glob("*.json")} == before  # no row is scored again
    records = report["benchmarks"]["retention"]["items"]
    summary = report["benchmarks"]["retention"]["checkpoints"]["base"]
    expected = gp_irt(
        retention.task_scores(records, "tiny_mmlu"),
        load_irt_file(irt_file),
        bundle="mmlu",
        scenario="mmlu",
    )
    assert summary["tiny_mmlu_gpirt"] == pytest.approx(expected["gpirt"]) and summary[
        "irt_file"
    ] == str(irt_file.resolve())
    assert summary["mean_gpirt"] is None  # five task rows are missing


def test_cli_runs_and_refuses_bad_irt_files(model_dir, irt_file, tmp_path, capsys) -> None:
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    common = [
        "eval",
        "retention",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--no-progress",
        "--data",
        str(data),
    ]
    assert (
        cli_main([*common, "--irt-file", str(irt_file)]) == 2
    )  # its lb bundle lacks the real scenarios
    assert "has no scenario 'hellaswag'" in capsys.readouterr().err
    assert cli_main([*common, "--irt-file", str(tmp_path / "none.pkl")]) == 2
    assert (
        "download https://raw.githubusercontent.com/felipemaiapolo/tinyBenchmarks"
        in capsys.readouterr().err
    )
    assert (
        cli_main([*common, "limit=2", "--max-new-tokens", "8", "tasks=tiny_mmlu,tiny_gsm8k_strict"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    summary = report["benchmarks"]["retention"]["checkpoints"]["base"]
    assert summary["tiny_mmlu_items"] == 2 and summary["tiny_gsm8k_strict_items"] == 2
    assert "tiny_hellaswag_accuracy" not in summary


@pytest.mark.slow
def test_smollm2_end_to_end_both_benchmarks(tmp_path) -> None:
    """SmolLM2 on two rows per task and two small PALOMA-layout slices, through the CLI."""
    from calibft.lm.load import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer("smollm2-135m")
    chat = ChatFormat.from_tokenizer(tokenizer)
    for row in ROWS["tinyMMLU"] + ROWS["tinyTruthfulQA"]:
        prompt = chat.render(row["input_formatted"])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer(prompt + " A", add_special_tokens=False)["input_ids"][: len(ids)] == ids
    data = write_data(tmp_path / "tiny")
    paloma_dir = tmp_path / "paloma"
    for name, text in (
        ("wikitext_103", "The history of the city begins in the Roman era. "),
        ("ptb", "Stock prices rose sharply on Tuesday as investors bought shares. "),
    ):
        (paloma_dir / name / "test").mkdir(parents=True)
        rows = [json.dumps({"text": text * (20 + 30 * i)}) for i in range(2)]  # up to ~600 tokens
        with gzip.open(paloma_dir / name / "test" / "part.jsonl.gz", "wt") as f:
            f.write("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = [
        "eval",
        "retention",
        "paloma",
        "--output",
        str(out),
        "--no-progress",
        "retention.data=" + str(data),
        "paloma.data=" + str(paloma_dir),
        "slices=wikitext_103,ptb",
        "limit=2",
        "--max-new-tokens",
        "64",
        "--window",
        "256",
        "--stride",
        "128",
    ]
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    retained = report["benchmarks"]["retention"]["checkpoints"]["base"]
    assert 0 <= retained["mean_accuracy"] <= 1 and retained["mean_gpirt"] is None
    records = [r for r in report["benchmarks"]["retention"]["items"] if "dataset" in r]
    assert len(records) == 10
    for record in records:
        if (
            record["dataset"] == "tinyGSM8k"
        ):  # the model answers in words and numbers, cut at its end
            assert record["response"] and "<|im_end|>" not in record["response"]
            assert record["flexible_prediction"] == retention.extract_gsm8k(
                record["response"], "flexible"
            )
        else:
            assert all(-100 < lp < 0 for lp in record["logprobs"])
    ppl = report["benchmarks"]["paloma"]["checkpoints"]["base"]
    assert 1 < ppl["perplexity"] < 10_000 and 0 < ppl["bits_per_byte"] < 10
