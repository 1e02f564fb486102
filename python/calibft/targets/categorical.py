"""Categorical targets: weighted lists of answers read from files (docs/targets.md).

One target per record: ``{"prompt": ..., "targets": [...], "weights": [...], "group": ...}``;
``weights`` is optional (uniform), ``group`` defaults to the file's name, and ``request`` is
accepted for ``prompt`` so that files in the format of Zhang et al. (2024), "Forcing Diffuse
Distributions out of Language Models", load as they are. Files are JSONL (one record per line),
JSON (one record, or a list of them) or YAML (a list of records). Every mistake is a one-line
ValueError naming the file, the line and the field, raised before any model is loaded;
`check_answers` adds the checks that need the tokenizer (end-of-turn token inside an answer,
sequence length), still before weights are loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from calibft.chat import ChatFormat
from calibft.targets.target import Target
from calibft.targets.trie import TrieTokenizer

SHIPPED_PREFIX = "shipped:"
"""Names the target sets shipped in the package, e.g. ``shipped:train`` (docs/targets.md)."""
SHIPPED = ("train", "heldout")
FORMATS = (".jsonl", ".json", ".yaml", ".yml")
_FIELDS = ("prompt", "request", "targets", "weights", "group", "response")


def resolve_path(name: str | Path) -> Path:
    """The file a target-set name refers to: a path, or ``shipped:<set>`` in the package."""
    text = str(name)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(text)
    which = text[len(SHIPPED_PREFIX) :]
    if which not in SHIPPED:
        choices = ", ".join(SHIPPED_PREFIX + s for s in SHIPPED)
        raise ValueError(f"targets: unknown shipped set {text!r}; choose {choices}")
    return Path(str(resources.files("calibft") / "data" / "categorical" / f"{which}.jsonl"))


def load_targets(path: str | Path) -> list[Target]:
    """The categorical targets of one file (JSONL, JSON or YAML; ``shipped:<set>`` for a set
    shipped in the package), in file order."""
    shown = str(path)
    file = resolve_path(path)
    if file.suffix not in FORMATS:
        raise ValueError(f"{shown}: target files must end in {', '.join(FORMATS)}")
    if not file.is_file():
        raise ValueError(f"{shown}: no such file")
    text = file.read_text(encoding="utf-8")
    records = _records(shown, file.suffix, text)
    targets = [_target(where, record, file.stem) for where, record in records]
    if not targets:
        raise ValueError(f"{shown}: holds no targets")
    return _unique(targets)


def load_target_files(paths: Sequence[str | Path]) -> list[Target]:
    """The targets of several files, in order; one prompt may not appear twice in a group."""
    return _unique([t for path in paths for t in load_targets(path)])


def _unique(targets: list[Target]) -> list[Target]:
    """`targets`, if no (group, prompt) appears twice: one prompt has one target distribution."""
    seen: dict[tuple[str, str], str | None] = {}
    for target in targets:
        key = (target.group, target.prompt)
        if key in seen:
            raise ValueError(f"{target.source}: prompt: the same prompt and group as {seen[key]}")
        seen[key] = target.source
    return targets


def _records(shown: str, suffix: str, text: str) -> Iterator[tuple[str, Any]]:
    """(``"<file> line <n>"``, parsed record) for every record of a file."""
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{shown} line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{shown} line {number}: not valid JSON ({err.msg})") from None
    elif suffix == ".json":
        yield from _json_records(shown, text)
    else:
        yield from _yaml_records(shown, text)


def _json_records(shown: str, text: str) -> Iterator[tuple[str, Any]]:
    """One JSON object, or a JSON list of objects, each with the line it starts on."""
    decoder = json.JSONDecoder()

    def line_of(index: int) -> int:
        return text.count("\n", 0, index) + 1

    def skip(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    try:
        start = skip(0)
        if not text.startswith("[", start):
            record, end = decoder.raw_decode(text, start)
            if skip(end) != len(text):
                raise json.JSONDecodeError("extra data after the record", text, skip(end))
            yield f"{shown} line {line_of(start)}", record
            return
        index = skip(start + 1)
        while not text.startswith("]", index):
            record, end = decoder.raw_decode(text, index)
            yield f"{shown} line {line_of(index)}", record
            index = skip(end)
            if text.startswith(",", index):
                index = skip(index + 1)
            elif not text.startswith("]", index):
                raise json.JSONDecodeError("expected ',' or ']'", text, index)
    except json.JSONDecodeError as err:
        raise ValueError(f"{shown} line {err.lineno}: not valid JSON ({err.msg})") from None


def _yaml_records(shown: str, text: str) -> Iterator[tuple[str, Any]]:
    """A YAML list of records (or one record), each with the line it starts on."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{shown} line {mark.line + 1}" if mark is not None else shown
        raise ValueError(
            f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})"
        ) from None
    if root is None:
        return
    if isinstance(root, yaml.SequenceNode):
        for node, record in zip(root.value, data, strict=True):
            yield f"{shown} line {node.start_mark.line + 1}", record
    else:
        yield f"{shown} line {root.start_mark.line + 1}", data


def _target(where: str, record: Any, default_group: str) -> Target:
    """One validated record (docs/targets.md)."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a record must be an object with a prompt and targets, got {_shown(record)}"
        )
    unknown = [key for key in record if key not in _FIELDS]
    if unknown:
        raise ValueError(
            f"{where}: {unknown[0]}: unknown field; a record has prompt (or request), targets, "
            "weights (optional) and group (optional)"
        )
    if "prompt" in record and "request" in record:
        raise ValueError(f"{where}: prompt: give either prompt or request, not both")
    name = "request" if "request" in record else "prompt"
    prompt = record.get(name)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: {name}: must be a non-empty string, got {_shown(prompt)}")
    # The peer format's response prefix: only an empty one means "the answer starts the reply".
    if record.get("response") not in (None, "", [], [""]):
        raise ValueError(
            f"{where}: response: answer prefixes are not supported; remove it or leave it empty"
        )
    answers = _answers(where, record.get("targets"))
    weights = _weights(where, record.get("weights"), len(answers))
    group = record.get("group", default_group)
    if not isinstance(group, str) or not group.strip():
        raise ValueError(f"{where}: group: must be a non-empty string, got {_shown(group)}")
    return Target.from_answers(prompt, answers, weights, group, source=where)


def _answers(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{where}: targets: must be a non-empty list of answer strings, got {_shown(value)}"
        )
    first_at: dict[str, int] = {}
    for number, answer in enumerate(value, 1):
        if not isinstance(answer, str):
            raise ValueError(
                f"{where}: targets: answer {number} is {_shown(answer)}, not a string; quote it"
            )
        if not answer.strip():
            raise ValueError(f"{where}: targets: answer {number} is empty")
        if answer in first_at:
            raise ValueError(
                f"{where}: targets: {answer!r} appears twice "
                f"(answers {first_at[answer]} and {number})"
            )
        first_at[answer] = number
    return tuple(value)


def _weights(where: str, value: Any, count: int) -> tuple[float, ...]:
    if value is None:
        return (1.0,) * count
    if not isinstance(value, list):
        raise ValueError(f"{where}: weights: must be a list of numbers, got {_shown(value)}")
    if len(value) != count:
        raise ValueError(
            f"{where}: weights: {len(value)} weights for {count} answers; give one per answer"
        )
    for number, weight in enumerate(value, 1):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{where}: weights: weight {number} is {_shown(weight)}, not a number")
        if not math.isfinite(weight):
            raise ValueError(f"{where}: weights: weight {number} is {weight}, not a finite number")
        if weight < 0:
            raise ValueError(f"{where}: weights: weight {number} is negative ({weight})")
    if not any(value):
        raise ValueError(
            f"{where}: weights: all weights are zero; at least one answer needs a positive weight"
        )
    return tuple(float(w) for w in value)


def _shown(value: Any) -> str:
    text = str(value) if isinstance(value, float) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_answers(
    targets: Sequence[Target],
    tokenizer: Any,
    *,
    chat: ChatFormat | None = None,
    max_seq_len: int | None = None,
    limit_name: str = "max_seq_len",
) -> None:
    """The checks that need the tokenizer, for every categorical target: no answer contains an
    end-of-turn token, no two answers tokenize to the same ids, answers do not merge with the chat
    prefix, and (if given) prompt + longest answer fit in ``max_seq_len`` tokens (the answer's
    end token is predicted, never read). Loads no model weights."""
    tok = TrieTokenizer.from_hf(tokenizer, chat)
    chat = tok.chat
    ends = {chat.end_token_id} | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    )
    for target in targets:
        if not target.is_categorical:
            continue
        try:
            offsets, ids = tok.encode_values(target.answers, target.prompt)
        except ValueError as err:
            raise ValueError(f"{target.source}: targets: {err}") from None
        paths = [tuple(ids[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        seen: dict[tuple[int, ...], str] = {}
        for answer, path in zip(target.answers, paths, strict=True):
            inside = ends.intersection(path[:-1])
            if inside:
                token = tokenizer.convert_ids_to_tokens(min(inside))
                raise ValueError(
                    f"{target.source}: targets: answer {answer!r} contains the end-of-turn token "
                    f"{token!r}; the model would stop before its end"
                )
            if path in seen:
                raise ValueError(
                    f"{target.source}: targets: {seen[path]!r} and {answer!r} are the same tokens "
                    "for this tokenizer; keep one of them"
                )
            seen[path] = answer
        if max_seq_len is not None:
            prompt_len = len(chat.prompt_ids(target.prompt))
            longest = int(np.max(np.diff(offsets))) - 1
            if prompt_len + longest > max_seq_len:
                raise ValueError(
                    f"{target.source}: prompt: {prompt_len} prompt tokens and a longest answer of "
                    f"{longest} exceed {limit_name}={max_seq_len}"
                )
