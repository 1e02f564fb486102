"""Capability retention on TinyBenchmarks (docs/benchmarks/retention.md): what calibration
fine-tuning cost on MMLU, HellaSwag, TruthfulQA, WinoGrande and GSM8K, as per-task accuracy and
tinyBenchmarks' IRT / p-IRT / gp-IRT estimates of the full-benchmark score.

Items are dataset rows (a GSM8K row serves both the strict and the flexible task row: one
generation, two extractors). The estimators need all 100 scores of a task, so they run in
`summarize`, on the IRT parameters `setup` loads once for the run; the file is no part of a row's
cache key, so `--irt-file` changes without re-scoring any row (docs/benchmarks/retention.md §7).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from calibft.config import option
from calibft.eval.benchmarks.retention.data import DATASETS, ROWS, RowCheck, load_rows
from calibft.eval.benchmarks.retention.irt import IRT_URL, check_irt, gp_irt, load_irt_file
from calibft.eval.contract import Item
from calibft.eval.figures import new_figure, save_figure
from calibft.eval.text import strip_reasoning

if TYPE_CHECKING:
    from calibft.chat import ChatFormat
    from calibft.lm import LM

NAME = "retention"
DESCRIPTION = "capability retention on TinyBenchmarks: per-task accuracy and gp-IRT (paper Table 2)"


@dataclass(frozen=True)
class Task:
    """A reported task row: its dataset, the record field holding its item score, and the IRT
    bundle and scenario that estimate it."""

    dataset: str
    field: str
    bundle: str
    scenario: str


TASKS = {
    "tiny_mmlu": Task("tinyMMLU", "score", "mmlu", "mmlu"),
    "tiny_hellaswag": Task("tinyHellaswag", "score", "lb", "hellaswag"),
    "tiny_truthfulqa": Task("tinyTruthfulQA", "score", "lb", "truthfulqa"),
    "tiny_winogrande": Task("tinyWinogrande", "score", "lb", "winogrande"),
    "tiny_gsm8k_strict": Task("tinyGSM8k", "strict_correct", "lb", "gsm8k"),
    "tiny_gsm8k_flexible": Task("tinyGSM8k", "flexible_correct", "lb", "gsm8k"),
}
MC_TASKS = ("tiny_mmlu", "tiny_hellaswag", "tiny_truthfulqa", "tiny_winogrande")
GROUPS = {
    "tinyMMLU": "tiny_mmlu",
    "tinyHellaswag": "tiny_hellaswag",
    "tinyTruthfulQA": "tiny_truthfulqa",
    "tinyWinogrande": "tiny_winogrande",
    "tinyGSM8k": "tiny_gsm8k",
}
# The before/after columns (headline table, model card): the paper's Table 2.
HEADLINE = (
    ("aggregate gp-IRT", "mean_gpirt"),
    ("mean accuracy", "mean_accuracy"),
    ("GSM8K strict", "gsm8k_strict_accuracy"),
)


@dataclass
class Config:
    """Settings of the retention benchmark (defaults: the paper's protocol)."""

    tasks: list[str] = option(
        list(TASKS), "task rows to score", choices=tuple(TASKS), cache_key=False
    )
    data: str | None = option(
        None,
        "directory of tinyMMLU.jsonl, tinyHellaswag.jsonl, tinyTruthfulQA.jsonl, "
        "tinyWinogrande.jsonl, "
        "tinyGSM8k.jsonl (default: the hub, needs calibft[retention])",
        cache_key=False,
    )
    irt_file: str | None = option(
        None,
        f"tinyBenchmarks.pkl with the IRT parameters (download once: {IRT_URL}); "
        "without it gp-IRT is null",
        cache_key=False,
    )
    limit: int = option(
        0,
        "score only the first N rows of each dataset (0: all 100; gp-IRT needs all)",
        min=0,
        max=ROWS,
        cache_key=False,
    )
    max_new_tokens: int = option(256, "GSM8K generation length limit in tokens", min=1)


# --- prompts and continuations -------------------------------------------------------------

_WHITESPACE = (" ", "\n", "\t")


def with_delimiter(context: str, continuation: str) -> str:
    """The continuation as scored after `context` (the raw task text): one space in between
    unless either side already has whitespace there."""
    if context.endswith(_WHITESPACE) or continuation.startswith(_WHITESPACE):
        return continuation
    return " " + continuation


def hellaswag_ending(text: str) -> str:
    """A HellaSwag ending cleaned of WikiHow markup, as lm-eval preprocesses it."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def winogrande_contexts(row: Mapping[str, Any]) -> tuple[list[str], str]:
    """Partial scoring: the two contexts (the prompt ending in option 1, then in option 2) and
    the shared continuation (the sentence after the blank)."""
    prompt = row["input_formatted"]
    options = [row["option1"], row["option2"]]
    suffix = next(o for o in sorted(options, key=len, reverse=True) if prompt.endswith(o))
    prefix = prompt[: len(prompt) - len(suffix)]
    continuation = " " + row["sentence"].split("_", 1)[1].strip()
    return [prefix + option for option in options], continuation


class ChoiceScorer(Protocol):
    """What the multiple-choice scorers use of an `LM` (`_ScoredOnce` stands in for one)."""

    chat: ChatFormat

    def encode(self, text: str) -> list[int]: ...

    def loglikelihood_requests(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[float]: ...


def choice_logprobs(lm: ChoiceScorer, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """log p(continuation | chat-rendered task text) of (task text, continuation) pairs, the
    delimiter rule applied; all pairs in one batched request.

    The continuation's tokens are those of ``render(text) + continuation`` beyond the rendered
    prompt's token count, scored after that many tokens of the same sequence."""
    prompts: dict[str, tuple[str, int]] = {}  # task text -> (rendered prompt, its token count)
    requests = []
    for text, continuation in pairs:
        if text not in prompts:
            rendered = lm.chat.render(text)
            # The rendered template carries its own special tokens (retention.md §2).
            prompts[text] = (rendered, len(lm.encode(rendered)))
        prompt, length = prompts[text]
        full = lm.encode(prompt + with_delimiter(text, continuation))
        if len(full) <= length:
            raise ValueError(f"continuation {continuation!r} adds no token to its prompt")
        requests.append((full[:length], full[length:]))
    return lm.loglikelihood_requests(requests)


def _argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values)))


# --- per-task scoring ----------------------------------------------------------------------


def score_mmlu(lm: ChoiceScorer, row: Mapping[str, Any]) -> dict[str, Any]:
    letters = [chr(ord("A") + i) for i in range(len(row["choices"]))]
    logprobs = choice_logprobs(lm, [(row["input_formatted"], letter) for letter in letters])
    correct = float(_argmax(logprobs) == int(row["answer"]))
    return {
        "logprobs": logprobs,
        "answer": int(row["answer"]),
        "score": correct,
        "raw_correct": correct,
    }


def score_hellaswag(lm: ChoiceScorer, row: Mapping[str, Any]) -> dict[str, Any]:
    endings = [hellaswag_ending(e) for e in row["endings"]]
    logprobs = choice_logprobs(lm, [(row["input_formatted"], " " + e) for e in endings])
    # acc_norm: per character of the cleaned ending (without the delimiter).
    normalized = [lp / max(1, len(e)) for lp, e in zip(logprobs, endings, strict=True)]
    label = int(row["label"])
    return {
        "logprobs": logprobs,
        "answer": label,
        "score": float(_argmax(normalized) == label),
        "raw_correct": float(_argmax(logprobs) == label),
    }


def score_truthfulqa(lm: ChoiceScorer, row: Mapping[str, Any]) -> dict[str, Any]:
    targets = row["mc2_targets"]
    labels = [int(x) for x in targets["labels"]]
    logprobs = choice_logprobs(lm, [(row["input_formatted"], " " + c) for c in targets["choices"]])
    values = np.asarray(logprobs, dtype=np.float64)
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    mc2 = float(sum(p for p, label in zip(probs, labels, strict=True) if label == 1))
    return {
        "logprobs": logprobs,
        "labels": labels,
        "score": mc2,
        "raw_correct": float(_argmax(logprobs) == labels.index(1)),
    }


def score_winogrande(lm: ChoiceScorer, row: Mapping[str, Any]) -> dict[str, Any]:
    contexts, continuation = winogrande_contexts(row)
    logprobs = choice_logprobs(lm, [(context, continuation) for context in contexts])
    correct = float(_argmax(logprobs) == int(row["answer"]) - 1)
    return {
        "logprobs": logprobs,
        "answer": int(row["answer"]),
        "score": correct,
        "raw_correct": correct,
    }


# --- GSM8K ---------------------------------------------------------------------------------

# A number: optional sign, then 1-3 digits with comma-separated thousands or plain digits, then
# an optional fractional part.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_STOPS = ("Question:", "</s>", "<|im_end|>")


def normalize_number(text: str) -> str | None:
    """`1,234.00` -> `1234`, `12.50` -> `12.5`; None when `text` is not a number."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_gold(answer: str) -> str | None:
    """The gold answer: the normalized text after the last ``####``."""
    _, marker, tail = answer.rpartition("####")
    return normalize_number(tail) if marker else None


def clean_response(text: str) -> str:
    """The answer as extracted from: cut at the first stop string, reasoning removed
    (`calibft.eval.text.strip_reasoning`)."""
    cuts = [text.find(stop) for stop in _STOPS if stop in text]
    text = text[: min(cuts)] if cuts else text
    return strip_reasoning(text.strip()).strip()


def extract_gsm8k(text: str, mode: str) -> str | None:
    """The model's answer as a normalized number, or None when extraction fails.

    ``strict``: the rest of the line after the first ``####`` must hold exactly one number;
    ``flexible``: the last number anywhere."""
    if mode == "strict":
        _, marker, tail = text.partition("####")
        if not marker:
            return None
        numbers = _NUMBER.findall(tail.split("\n", 1)[0])
        return normalize_number(numbers[0]) if len(numbers) == 1 else None
    if mode == "flexible":
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")


def score_gsm8k(lm: LM, row: Mapping[str, Any], max_new_tokens: int) -> dict[str, Any]:
    ids = lm.greedy(lm.chat.prompt_ids(row["input_formatted"]), max_new_tokens)
    return gsm8k_record(lm, row, ids)


def gsm8k_record(lm: LM, row: Mapping[str, Any], ids: Sequence[int]) -> dict[str, Any]:
    """A GSM8K row's record from its greedy generation `ids`."""
    response = clean_response(lm.decode(ids))
    gold = gsm8k_gold(row["answer"])
    record: dict[str, Any] = {"response": response, "gold": gold}
    for mode in ("strict", "flexible"):
        prediction = extract_gsm8k(response, mode)
        record[f"{mode}_prediction"] = prediction
        record[f"{mode}_correct"] = float(prediction is not None and prediction == gold)
        record[f"{mode}_failed"] = float(prediction is None)
    return record


# --- row checks (what the scoring above relies on) -------------------------------------------


def _check_common(row: Mapping[str, Any]) -> str | None:
    text = row.get("input_formatted")
    return None if isinstance(text, str) and text.strip() else "has no input_formatted text"


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_mmlu(row: Mapping[str, Any]) -> str | None:
    if not _strings(row["choices"]):
        return "has no list of choices"
    answer = row["answer"]
    ok = (
        isinstance(answer, int)
        and not isinstance(answer, bool)
        and 0 <= answer < len(row["choices"])
    )
    return None if ok else f"answer {answer!r} is not a choice index"


def _check_hellaswag(row: Mapping[str, Any]) -> str | None:
    if not _strings(row["endings"]):
        return "has no list of endings"
    label = str(row["label"])
    return (
        None
        if label.isdigit() and int(label) < len(row["endings"])
        else f"label {row['label']!r} is not an ending index"
    )


def _check_truthfulqa(row: Mapping[str, Any]) -> str | None:
    targets = row["mc2_targets"]
    if not isinstance(targets, Mapping) or not _strings(targets.get("choices")):
        return "has no mc2_targets.choices"
    labels = targets.get("labels")
    if (
        not isinstance(labels, list)
        or len(labels) != len(targets["choices"])
        or any(x not in (0, 1) for x in labels)
    ):
        return "needs one 0/1 mc2_targets label per choice"
    return None if 1 in labels else "has no true mc2 choice"


def _check_winogrande(row: Mapping[str, Any]) -> str | None:
    options = [row["option1"], row["option2"]]
    if not all(isinstance(o, str) and o for o in options) or str(row["answer"]) not in ("1", "2"):
        return "needs two options and an answer of '1' or '2'"
    if not isinstance(row["sentence"], str) or "_" not in row["sentence"]:
        return "has no blank (_) in its sentence"
    return (
        None
        if any(row["input_formatted"].endswith(o) for o in options)
        else "has input_formatted ending in neither option"
    )


def _check_gsm8k(row: Mapping[str, Any]) -> str | None:
    ok = isinstance(row["answer"], str) and gsm8k_gold(row["answer"]) is not None
    return None if ok else "has no number after '####' in its answer"


_MC_SCORERS = {
    "tinyMMLU": score_mmlu,
    "tinyHellaswag": score_hellaswag,
    "tinyTruthfulQA": score_truthfulqa,
    "tinyWinogrande": score_winogrande,
}
_CHECKS = {
    "tinyMMLU": _check_mmlu,
    "tinyHellaswag": _check_hellaswag,
    "tinyTruthfulQA": _check_truthfulqa,
    "tinyWinogrande": _check_winogrande,
    "tinyGSM8k": _check_gsm8k,
}


def _check_row(dataset: str) -> RowCheck:
    def check(row: dict[str, Any]) -> str | None:
        return _check_common(row) or _CHECKS[dataset](row)

    return check


# --- the benchmark -------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    dataset: str
    index: int
    row: dict[str, Any]


@dataclass(frozen=True)
class IRT:
    """The run's shared state: the IRT parameters (None without ``irt_file``), loaded once."""

    params: dict[str, Any] | None
    file: str | None


def items(config: Config) -> list[Item[Row]]:
    """One item per row of each needed dataset (key: dataset, row, content digest); the data are
    checked here, before any model loads."""
    if not config.tasks:
        raise ValueError("tasks selects no task row; choose from " + ", ".join(TASKS))
    datasets = list(dict.fromkeys(TASKS[t].dataset for t in TASKS if t in config.tasks))
    out = []
    for name in datasets:
        rows = load_rows(DATASETS[name], config.data, _check_row(name))
        for index, row in enumerate(rows[: config.limit or ROWS]):
            key = (name, index, _digest(json.dumps(row, sort_keys=True).encode()))
            out.append(Item(key, GROUPS[name], Row(name, index, row)))
    return out


def setup(config: Config, items: Sequence[Item[Row]]) -> IRT:
    """Load and check the IRT file, before any model loads."""
    if config.irt_file is None:
        return IRT(None, None)
    params = load_irt_file(config.irt_file)
    needs: dict[str, list[str]] = {}
    for task in config.tasks:
        needs.setdefault(TASKS[task].bundle, []).append(TASKS[task].scenario)
    check_irt(params, needs, config.irt_file)
    return IRT(params, str(Path(config.irt_file).resolve()))


def run_item(lm: LM, item: Item[Row], config: Config, state: IRT, seed: int) -> dict[str, Any]:
    """The record of one row under one checkpoint (nothing is sampled: `seed` goes unused)."""
    row = item.payload
    if row.dataset == "tinyGSM8k":
        record = score_gsm8k(lm, row.row, config.max_new_tokens)
    else:
        record = _MC_SCORERS[row.dataset](lm, row.row)
    return {"dataset": row.dataset, "row": row.index, **record}


def run_batch(
    lm: LM, items: Sequence[Item[Row]], config: Config, state: IRT, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """`run_item` of several rows: the GSM8K rows decoded together (one `greedy_many`), the
    choices of every multiple-choice row scored in one `loglikelihood_requests` call."""
    rows = [item.payload for item in items]
    gsm8k = [row for row in rows if row.dataset == "tinyGSM8k"]
    generated = lm.greedy_many(
        [lm.chat.prompt_ids(row.row["input_formatted"]) for row in gsm8k], config.max_new_tokens
    )
    records = {
        id(row): gsm8k_record(lm, row.row, ids) for row, ids in zip(gsm8k, generated, strict=True)
    }
    choices = [row for row in rows if row.dataset != "tinyGSM8k"]
    scored = _ScoredOnce(lm)
    for row in choices:  # first pass: the requests; their scores are placeholders
        _MC_SCORERS[row.dataset](scored, row.row)
    scored.score()
    for row in choices:  # second pass: the same requests answered from the one batched call
        records[id(row)] = _MC_SCORERS[row.dataset](scored, row.row)
    return [{"dataset": row.dataset, "row": row.index, **records[id(row)]} for row in rows]


class _ScoredOnce:
    """The LM that `run_batch` hands the multiple-choice scorers (each asks one
    `loglikelihood_requests`): before `score`, it records the requests and answers zeros; `score`
    sends them all to the real LM at once; after it, each call gets its recorded answers in turn.
    The scorers thus run unchanged, their requests batched across rows."""

    def __init__(self, lm: LM) -> None:
        self.lm, self.chat, self.encode = lm, lm.chat, lm.encode
        self.requests: list[list[tuple[Sequence[int], Sequence[int]]]] = []
        self.answers: list[list[float]] | None = None

    def loglikelihood_requests(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[float]:
        if self.answers is None:
            self.requests.append(list(requests))
            return [0.0] * len(requests)
        return self.answers.pop(0)

    def score(self) -> None:
        flat = self.lm.loglikelihood_requests([r for call in self.requests for r in call])
        self.answers, start = [], 0
        for call in self.requests:
            self.answers.append(flat[start : start + len(call)])
            start += len(call)


def task_scores(records: Sequence[Mapping[str, Any]], task: str) -> list[float]:
    """A task row's item scores in dataset order."""
    spec = TASKS[task]
    rows = sorted((r for r in records if r.get("dataset") == spec.dataset), key=lambda r: r["row"])
    return [float(r[spec.field]) for r in rows]


def _mean_of(figures: Mapping[str, Any], names: Sequence[str], figure: str) -> float | None:
    """The mean of `figure` over the task rows `names`; None unless every one has it."""
    values = [figures.get(f"{name}_{figure}") for name in names]
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if len(present) == len(values) else None


def summarize(records: Sequence[Mapping[str, Any]], state: IRT) -> dict[str, Any]:
    """One checkpoint's figures: the paper's aggregates (each defined only when all the task rows
    it averages are present), then per task row its accuracy, IRT, p-IRT and gp-IRT."""
    params = state.params
    per_task: dict[str, Any] = {}
    for task, spec in TASKS.items():
        scores = task_scores(records, task)
        if not scores:
            continue
        estimates: dict[str, Any] = {"irt": None, "pirt": None, "gpirt": None}
        if params is not None and len(scores) == ROWS:
            estimates = gp_irt(scores, params, bundle=spec.bundle, scenario=spec.scenario)
        per_task[f"{task}_items"] = len(scores)
        per_task[f"{task}_accuracy"] = statistics.fmean(scores)
        per_task.update({f"{task}_{k}": v for k, v in estimates.items()})
    gsm8k = [r for r in records if r.get("dataset") == "tinyGSM8k"]
    failures = {
        f"gsm8k_{mode}_extraction_failure": statistics.fmean(r[f"{mode}_failed"] for r in gsm8k)
        if gsm8k
        else None
        for mode in ("strict", "flexible")
    }
    return {
        "mean_gpirt": _mean_of(per_task, list(TASKS), "gpirt"),
        "mean_accuracy": _mean_of(per_task, list(TASKS), "accuracy"),
        "mean_mc_accuracy": _mean_of(per_task, MC_TASKS, "accuracy"),
        "gsm8k_strict_accuracy": per_task.get("tiny_gsm8k_strict_accuracy"),
        "gsm8k_flexible_accuracy": per_task.get("tiny_gsm8k_flexible_accuracy"),
        **failures,
        **per_task,
        "irt_file": state.file,
    }


TABLE_FIELDS = (
    ("item score (acc_norm for HellaSwag, mc2 for TruthfulQA)", "score"),
    ("raw-argmax accuracy", "raw_correct"),
    ("GSM8K strict correct", "strict_correct"),
    ("GSM8K flexible correct", "flexible_correct"),
)


def plots(
    directory: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """``retention_tasks.png``: per task row, every checkpoint's accuracy and gp-IRT."""
    summaries = result["checkpoints"]
    tasks = [t for t in TASKS if any(f"{t}_accuracy" in s for s in summaries.values())]
    if not tasks:
        return []
    fig = new_figure(figsize=(max(6.0, (0.8 + 0.3 * len(summaries)) * len(tasks)), 6.4))
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(tasks))
    width = 0.8 / max(1, len(summaries))
    for ax, figure in zip(axes, ("accuracy", "gpirt"), strict=True):
        for i, (name, summary) in enumerate(summaries.items()):
            values = [summary.get(f"{t}_{figure}") for t in tasks]
            left = x - 0.4 + i * width
            shown = [v is not None for v in values]
            ax.bar(
                left[shown],
                [v for v in values if v is not None],
                width,
                align="edge",
                color=f"C{i}",
                label=name,
            )
            for j, ok in enumerate(shown):
                if not ok:  # undefined (no IRT file, or fewer than 100 rows): say so, never draw 0
                    ax.text(
                        left[j] + width / 2,
                        0.02,
                        "n/a",
                        rotation=90,
                        ha="center",
                        fontsize=7,
                        color=f"C{i}",
                    )
        ax.set_ylabel("gp-IRT" if figure == "gpirt" else "accuracy")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(x, tasks, rotation=30, ha="right", fontsize=8)
    path = directory / "retention_tasks.png"
    save_figure(fig, path)
    return [path]
