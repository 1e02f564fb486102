"""PALOMA-style perplexity and bits per byte (docs/benchmarks/paloma.md): how well a checkpoint
still models plain text, per slice and pooled over slices.

Each document is tokenized on its own (no chat template, no BOS or EOS unless ``bos``) and scored
in 2048-token windows with stride 1024, so every token but the first is scored exactly once with
at least 1024 tokens of context once the document is long enough
(`calibft.lm.score.scored_windows`; with stride == window the windows do not overlap and each
window's first token, which has no context, is not scored). Windows of
many documents share forward passes; documents are never packed together. An item is a whole
slice (one ``allenai/paloma`` configuration, or one file the user gives), so its record holds the
slice's totals and the report's per-slice tables are exact.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibft.config import option
from calibft.eval.contract import Item

if TYPE_CHECKING:
    from calibft.lm import LM

NAME = "paloma"
DESCRIPTION = "PALOMA-style perplexity and bits per byte per slice and pooled (paper Table 2)"

HUB_ID = "allenai/paloma"
SLICES = ("wikitext_103", "c4_en", "dolma-v1_5", "mc4", "ptb", "redpajama", "falcon-refinedweb")
SPLIT = "test"
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass
class Config:
    """Settings of the PALOMA benchmark (defaults: the paper's protocol)."""

    data: str | None = option(
        None,
        "local copy of allenai/paloma in the hub's layout (<DIR>/<slice>/test/*.jsonl.gz); "
        "default: the gated hub dataset",
        cache_key=False,
    )
    files: list[str] = option(
        [],
        "score these text (.txt: one document) or JSON-lines (.jsonl[.gz]: one per row) "
        "files instead, "
        "each file a slice: files=a.txt,b.jsonl",
        cache_key=False,
    )
    slices: list[str] = option(
        list(SLICES), "PALOMA slices to score", choices=SLICES, cache_key=False
    )
    text_field: str = option("text", "JSON-lines field holding a document's text")
    window: int = option(2048, "tokens per scoring window", min=2)
    stride: int = option(
        1024,
        "tokens between window starts (new tokens scored per full window; = window: "
        "non-overlapping windows, each one's first token unscored)",
        min=1,
    )
    bos: bool = option(
        False, "prepend the tokenizer's BOS to every document (scored: all its tokens)"
    )
    max_documents: int = option(0, "score only the first N documents of each slice (0: all)", min=0)
    batch_tokens: int = option(
        8192, "tokens per forward pass (windows of several documents)", min=1, cache_key=False
    )

    def check(self) -> None:
        if self.stride > self.window:
            raise ValueError(
                f"stride must be <= window (tokens between windows would go unscored), got "
                f"stride={self.stride}, window={self.window}"
            )
        if self.data is not None and self.files:
            raise ValueError("give either --data DIR (PALOMA's layout) or files=..., not both")


@dataclass(frozen=True)
class SourceFile:
    """One file's documents: their texts (valid rows only) and the rows skipped for lack of text."""

    path: str
    texts: list[str]
    skipped: int


@dataclass(frozen=True)
class Slice:
    """A slice: its name and its files' documents."""

    name: str
    files: list[SourceFile]


def read_documents(path: Path, text_field: str) -> SourceFile:
    """The documents of a .txt file (the whole file) or of a JSON-lines file (one per row; rows
    whose text is missing, not a string or blank are skipped and counted)."""
    name = path.name
    try:
        if not name.endswith(_JSONL_SUFFIXES):
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise ValueError(f"{path}: the file holds no text")
            return SourceFile(str(path), [text], 0)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    texts: list[str] = []
    skipped = 0
    first = True
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object")
        if first and text_field not in row:
            raise ValueError(
                f"{path}: the first row has no {text_field!r} field "
                f"(fields: {', '.join(row)}); set text_field=FIELD"
            )
        first = False
        value = row.get(text_field)
        if isinstance(value, str) and value.strip():
            texts.append(value)
        else:
            skipped += 1
    if not texts:
        raise ValueError(f"{path}: no document with text in field {text_field!r}")
    return SourceFile(str(path), texts, skipped)


def slice_files(root: Path, name: str) -> list[Path]:
    """The test files of slice `name` in a PALOMA copy, in sorted filename order."""
    directory = root / name / SPLIT
    if not directory.is_dir():
        raise ValueError(
            f"{directory}: missing; --data must hold PALOMA's layout "
            f"<DIR>/<slice>/{SPLIT}/*.jsonl.gz"
        )
    found = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith(_JSONL_SUFFIXES)
    )
    if not found:
        raise ValueError(f"{directory}: no .jsonl or .jsonl.gz file")
    return found


def _hub_copy(slices: Sequence[str]) -> Path:
    """A local snapshot of the chosen slices of the gated hub dataset."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            HUB_ID, repo_type="dataset", allow_patterns=[f"{s}/{SPLIT}/*" for s in slices]
        )
    except Exception as err:  # offline, not logged in, licence not accepted: one message for all
        raise ValueError(
            f"cannot download {HUB_ID} ({type(err).__name__}); it is gated: accept its licence "
            "on the hub and log in (huggingface-cli login), or give a local copy with --data DIR "
            "or your own files=..."
        ) from None
    return Path(path)


def _limited(files: list[SourceFile], limit: int) -> list[SourceFile]:
    """The first `limit` documents of a slice, across its files in order (0: all)."""
    if not limit:
        return files
    out, left = [], limit
    for source in files:
        if left > 0:
            out.append(replace(source, texts=source.texts[:left]))
            left -= len(out[-1].texts)
    return out


def _fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def items(config: Config) -> list[Item[Slice]]:
    """One item per slice, keyed by its name and a digest of its files' bytes (edited data is
    never served from the cache); every file is read and checked here, before any model loads."""
    if config.files:
        groups = {}
        for given in config.files:
            path = Path(given)
            if path.name in groups:
                raise ValueError(
                    f"files: two files are named {path.name!r}; each file is a slice, rename one"
                )
            if not path.is_file():
                raise ValueError(f"files: {given!r} is not a file")
            groups[path.name] = [path]
    else:
        if not config.slices:
            raise ValueError("slices selects no slice; choose from " + ", ".join(SLICES))
        root = Path(config.data) if config.data is not None else _hub_copy(config.slices)
        if not root.is_dir():
            raise ValueError(f"--data {str(root)!r} is not a directory")
        groups = {name: slice_files(root, name) for name in config.slices}
    out = []
    for name, paths in groups.items():
        sources = _limited(
            [read_documents(p, config.text_field) for p in paths], config.max_documents
        )
        out.append(Item((name, _fingerprint(paths)), name, Slice(name, sources)))
    return out


class Tokens:
    """The run's shared state: each slice's token ids, made once for all checkpoints."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.slices: dict[str, list[list[np.ndarray]]] = {}

    def of(self, lm: LM, part: Slice) -> list[list[np.ndarray]]:
        """Per file, per document: its token ids (BOS first with ``bos``)."""
        if part.name not in self.slices:
            if self.config.bos and lm.bos_id is None:
                raise ValueError("bos: this tokenizer has no BOS token; run without --bos")
            prefix = [lm.bos_id] if self.config.bos else []
            self.slices[part.name] = [
                [np.asarray(prefix + lm.encode(text), dtype=np.int64) for text in source.texts]
                for source in part.files
            ]
        return self.slices[part.name]


def setup(config: Config, items: Sequence[Item[Slice]]) -> Tokens:
    return Tokens(config)


def figures(num_tokens: int, num_bytes: int, total_nll: float) -> dict[str, float | None]:
    """Mean NLL per token, perplexity and bits per byte of pooled totals (None when empty)."""
    per_token = total_nll / num_tokens if num_tokens else None
    return {
        "avg_nll_per_token": per_token,
        "perplexity": math.exp(per_token) if per_token is not None else None,
        "bits_per_byte": total_nll / (math.log(2) * num_bytes) if num_bytes else None,
    }


_COUNTS = ("num_documents", "num_skipped_rows", "num_tokens", "num_bytes", "total_nll")


def _pooled(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {key: sum(r[key] for r in rows) for key in _COUNTS}
    return {**totals, **figures(totals["num_tokens"], totals["num_bytes"], totals["total_nll"])}


def run_item(lm: LM, item: Item[Slice], config: Config, state: Tokens, seed: int) -> dict[str, Any]:
    """A slice's totals and figures under one checkpoint, and per file (nothing is sampled)."""
    part = item.payload
    tokens = state.of(lm, part)
    documents = [ids.tolist() for per_file in tokens for ids in per_file]
    scores = iter(lm.document_nlls(documents, config.window, config.stride, config.batch_tokens))
    files = []
    for source, per_file in zip(part.files, tokens, strict=True):
        nll, count = 0.0, 0
        for _ in per_file:
            doc_nll, doc_count = next(scores)
            nll += doc_nll
            count += doc_count
        files.append(
            {
                "file": source.path,
                "num_documents": len(source.texts),
                "num_skipped_rows": source.skipped,
                "num_tokens": count,
                # Bytes of the whole text, first tokens and too-short documents included (docs §3).
                "num_bytes": sum(len(t.encode("utf-8")) for t in source.texts),
                "total_nll": nll,
            }
        )
    return {"slice": part.name, "bos": config.bos, **_pooled(files), "files": files}


def summarize(records: Sequence[Mapping[str, Any]], state: Tokens) -> dict[str, Any]:
    """Totals and figures pooled over the slices (token- and byte-weighted, not a mean of slice
    figures), then each slice's own."""
    slices = {
        r["slice"]: {
            key: r[key] for key in (*_COUNTS, "avg_nll_per_token", "perplexity", "bits_per_byte")
        }
        for r in records
    }
    return {**_pooled(records), "bos": any(r["bos"] for r in records), "slices": slices}


# The before/after columns (headline table, model card): the paper's Table 2.
HEADLINE = (("perplexity", "perplexity"), ("bits per byte", "bits_per_byte"))
TABLE_FIELDS = (
    ("perplexity", "perplexity"),
    ("bits per byte", "bits_per_byte"),
    ("scored tokens", "num_tokens"),
    ("documents", "num_documents"),
)
