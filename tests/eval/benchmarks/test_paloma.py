"""The `paloma` benchmark: the window builder, exact NLL totals with a bigram stub model, windowed
vs single-pass scoring on a tiny model, the loaders, and runs through `evaluate` and the CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, tiny_tokenizer
from transformers import PretrainedConfig

from calibft.cli import main as cli_main
from calibft.eval.benchmarks import paloma
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate
from calibft.lm import HFSession
from calibft.lm.score import document_nlls, rolling_nll, scored_windows


def brute_force_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windowing rule written out literally: starts 0, s, 2s, ...; stop at a window of fewer
    than 2 tokens or after the window reaching n; score positions >= max(previous end, start+1)."""
    out = []
    previous_end = 0
    start = 0
    while True:
        end = min(start + window, n)
        if end - start < 2:
            break
        out.append((start, end, max(previous_end, start + 1)))
        previous_end = end
        if end == n:
            break
        start += stride
    return out


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 300), st.integers(2, 40), st.data())
def test_windows_match_the_rule_and_score_every_token_once(n, window, data) -> None:
    stride = data.draw(st.integers(1, window))
    spans = scored_windows(n, window, stride)
    assert spans == brute_force_windows(n, window, stride)
    scored = [p for start, end, first in spans for p in range(first, end)]
    # Every token but the first, exactly once; with stride == window (windows that do not
    # overlap) every window's first token has no context and is not scored.
    unscored = set(range(0, n, window)) if stride == window else {0}
    assert sorted(scored) == [p for p in range(n) if p not in unscored]
    for start, end, first in spans:
        assert start < first <= end <= start + window
        for position in range(first, end):  # past the first window: >= window - stride of context
            assert position - start >= min(position, window - stride)


def test_windows_at_the_paper_sizes() -> None:
    assert scored_windows(0) == scored_windows(1) == []
    assert scored_windows(2048) == [(0, 2048, 1)]
    assert scored_windows(2049) == [(0, 2048, 1), (1024, 2049, 2048)]
    assert scored_windows(5000)[-1] == (3072, 5000, 4096)
    assert scored_windows(17, window=8, stride=8) == [(0, 8, 1), (8, 16, 9)]
    with pytest.raises(ValueError, match="stride"):
        scored_windows(10, window=8, stride=9)


# --- a bigram stub: every next-token distribution is known ------------------------------------

VOCAB = 258  # bytes, a BOS id (256) and one unused id


class ByteTokenizer:
    """UTF-8 bytes as token ids; BOS is 256."""

    bos_token_id = 256

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": list(text.encode("utf-8"))}


class _OneHotDecoder(torch.nn.Module):
    def forward(self, input_ids, **_):
        return SimpleNamespace(
            last_hidden_state=torch.nn.functional.one_hot(input_ids, VOCAB).float()
        )


class BigramModel(torch.nn.Module):
    """A causal LM whose next-token log-probabilities depend only on the current token: the
    hidden state is the token's one-hot vector and the LM head holds log P(next | current)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(VOCAB, VOCAB, generator=generator) * 2, dim=-1)
        self.head = torch.nn.Linear(VOCAB, VOCAB, bias=False)
        self.head.weight.data = self.table.T.contiguous()
        self.decoder = _OneHotDecoder()
        self.config = PretrainedConfig()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def exact_nll(model: BigramModel, ids: list[int]) -> float:
    return -sum(float(model.table[a, b]) for a, b in itertools.pairwise(ids))


@pytest.mark.parametrize(
    "window,stride,batch_tokens", [(2048, 1024, 8192), (8, 3, 8), (5, 4, 64), (16, 8, 1)]
)
def test_document_nlls_are_exact_on_a_bigram_model(window, stride, batch_tokens) -> None:
    model = BigramModel()
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 256, size=n).tolist() for n in (0, 1, 2, 7, 30, 61)]
    got = document_nlls(model, documents, window=window, stride=stride, batch_tokens=batch_tokens)
    for ids, (nll, count) in zip(documents, got, strict=True):
        assert count == max(0, len(ids) - 1)
        assert nll == pytest.approx(exact_nll(model, ids), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("window,batch_tokens", [(8, 8), (5, 64)])
def test_non_overlapping_windows_skip_each_windows_first_token(window, batch_tokens) -> None:
    """stride == window: windows [0, w), [w, 2w), ...; each window's first token has no context
    in it and is not scored, so a document of n tokens scores n - ceil(n / w) of them."""
    model = BigramModel()
    rng = np.random.default_rng(1)
    documents = [rng.integers(0, 256, size=n).tolist() for n in (0, 1, 2, window + 1, 30, 61)]
    got = document_nlls(model, documents, window=window, stride=window, batch_tokens=batch_tokens)
    for ids, (nll, count) in zip(documents, got, strict=True):
        pairs = [(ids[p - 1], ids[p]) for p in range(1, len(ids)) if p % window]
        assert count == len(pairs) == len(ids) - math.ceil(len(ids) / window)
        expected = -sum(float(model.table[a, b]) for a, b in pairs)
        assert nll == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert paloma.Config(window=8, stride=8).stride == 8
    with pytest.raises(ValueError, match="stride must be <= window"):
        paloma.Config(window=8, stride=9).check()


def write_jsonl_gz(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((json.dumps(row) if not isinstance(row, str) else row) + "\n")


def make_paloma(root: Path) -> Path:
    """Two slices in the hub's layout: c4_en in two files (read in sorted order) with a blank line,
    a whitespace-only text and a row without text; ptb in one file."""
    write_jsonl_gz(root / "c4_en/test/b.jsonl.gz", [{"text": "zz top é\n", "id": 3}])
    write_jsonl_gz(
        root / "c4_en/test/a.jsonl.gz",
        [
            {"text": "The quick brown fox jumps over the lazy dog. " * 3, "id": 1},
            "",
            {"text": "  "},
            {"id": 2},
            {"text": "x"},
        ],
    )
    write_jsonl_gz(root / "ptb/test/test.jsonl.gz", [{"text": "a stock index rose " * 5}])
    return root


def test_run_item_and_summary_hold_exact_totals(tmp_path) -> None:
    model = BigramModel(seed=1)
    lm = HFSession(model=model, tokenizer=ByteTokenizer(), chat=None, end_ids=[])
    config = paloma.Config(
        data=str(make_paloma(tmp_path)), slices=["c4_en", "ptb"], window=8, stride=5
    )
    items = paloma.items(config)
    state = paloma.setup(config, items)
    records = [
        {"checkpoint": "base", "group": i.group, **paloma.run_item(lm, i, config, state, 0)}
        for i in items
    ]
    c4, ptb = records
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "x", "zz top é\n"]
    assert [f["file"].rsplit("/", 1)[1] for f in c4["files"]] == ["a.jsonl.gz", "b.jsonl.gz"]
    assert (c4["num_documents"], c4["num_skipped_rows"]) == (3, 2)
    assert c4["num_tokens"] == sum(len(t.encode()) - 1 for t in texts)
    assert c4["num_bytes"] == sum(len(t.encode()) for t in texts)  # the 1-token document's byte too
    expected = sum(exact_nll(model, list(t.encode())) for t in texts)
    assert c4["total_nll"] == pytest.approx(expected, rel=1e-6)
    assert c4["perplexity"] == pytest.approx(math.exp(expected / c4["num_tokens"]))
    assert c4["bits_per_byte"] == pytest.approx(expected / (math.log(2) * c4["num_bytes"]))
    summary = paloma.summarize(records, state)
    tokens = c4["num_tokens"] + ptb["num_tokens"]
    nll = c4["total_nll"] + ptb["total_nll"]
    nbytes = c4["num_bytes"] + ptb["num_bytes"]
    assert (summary["num_documents"], summary["num_tokens"], summary["num_bytes"]) == (
        4,
        tokens,
        nbytes,
    )
    # Pooled over tokens and bytes, not a mean of the slices' figures.
    assert summary["perplexity"] == pytest.approx(math.exp(nll / tokens))
    assert summary["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes))
    assert summary["slices"]["ptb"]["bits_per_byte"] == ptb["bits_per_byte"]


def test_bos_mode_scores_every_real_token(tmp_path) -> None:
    model = BigramModel(seed=2)
    lm = HFSession(model=model, tokenizer=ByteTokenizer(), chat=None, end_ids=[])
    config = paloma.Config(data=str(make_paloma(tmp_path)), slices=["ptb"], bos=True)
    (item,) = paloma.items(config)
    record = paloma.run_item(lm, item, config, paloma.setup(config, [item]), 0)
    text = "a stock index rose " * 5
    assert record["num_tokens"] == len(text)
    assert record["total_nll"] == pytest.approx(exact_nll(model, [256, *text.encode()]), rel=1e-6)
    assert record["num_bytes"] == len(text) and record["bos"] is True
    lm.tokenizer.bos_token_id = None
    with pytest.raises(ValueError, match="no BOS"):
        paloma.run_item(lm, item, config, paloma.setup(config, [item]), 0)


# --- the real code path on a tiny transformer ----------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer), tokenizer


def single_pass_nll(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return -float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_windowed_equals_single_pass_when_the_window_covers_the_document(tiny) -> None:
    model, _ = tiny
    ids = np.random.default_rng(1).integers(0, 300, size=60).tolist()
    nll, count = rolling_nll(model, ids, window=64, stride=32)
    assert count == 59
    assert nll == pytest.approx(single_pass_nll(model, ids), rel=1e-5)
    # Shorter windows lose context, so the total moves, but every token is still counted once.
    short, short_count = rolling_nll(model, ids, window=16, stride=8)
    assert short_count == 59 and short != pytest.approx(nll, rel=1e-6)


def test_sharing_forward_passes_changes_no_document_score(tiny) -> None:
    model, _ = tiny
    rng = np.random.default_rng(2)
    documents = [rng.integers(0, 300, size=n).tolist() for n in (3, 40, 17, 90, 2, 1)]
    alone = [rolling_nll(model, d, window=32, stride=16, batch_tokens=1) for d in documents]
    shared = document_nlls(model, documents, window=32, stride=16, batch_tokens=256)
    for (a, ca), (b, cb) in zip(alone, shared, strict=True):
        assert ca == cb and b == pytest.approx(a, rel=1e-5, abs=1e-5)


# --- loaders ---------------------------------------------------------------------------------


def test_first_row_without_text_is_an_error_naming_the_file(tmp_path) -> None:
    write_jsonl_gz(tmp_path / "ptb/test/x.jsonl.gz", [{"id": 1}, {"text": "fine"}])
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz: the first row has no 'text' field"):
        paloma.items(paloma.Config(data=str(tmp_path), slices=["ptb"]))


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda root: None, r"c4_en/test: missing"),
        (lambda root: (root / "c4_en/test").mkdir(parents=True), r"no \.jsonl or \.jsonl\.gz file"),
        (
            lambda root: write_jsonl_gz(root / "c4_en/test/a.jsonl.gz", ["{oops"]),
            r"a\.jsonl\.gz: line 1 is not JSON",
        ),
        (
            lambda root: write_jsonl_gz(root / "c4_en/test/a.jsonl.gz", [{"text": " "}]),
            r"no document with text",
        ),
        (
            lambda root: write_jsonl_gz(root / "c4_en/test/a.jsonl.gz", ["[1, 2]"]),
            r"line 1 is a JSON list",
        ),
    ],
)
def test_bad_data_is_one_line_naming_the_file(tmp_path, setup, message) -> None:
    setup(tmp_path)
    with pytest.raises(ValueError, match=message):
        paloma.items(paloma.Config(data=str(tmp_path), slices=["c4_en"]))


def test_user_files_are_slices(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("one whole document\nof two lines\n")
    (tmp_path / "rows.jsonl").write_text(
        '{"prompt": "first"}\n{"prompt": ""}\n{"prompt": "second"}\n'
    )
    config = paloma.Config(
        files=[str(tmp_path / "notes.txt"), str(tmp_path / "rows.jsonl")], text_field="prompt"
    )
    notes, rows = paloma.items(config)
    assert (notes.group, rows.group) == ("notes.txt", "rows.jsonl")
    assert notes.payload.files[0].texts == ["one whole document\nof two lines\n"]
    assert rows.payload.files[0].texts == ["first", "second"] and rows.payload.files[0].skipped == 1
    assert paloma.items(paloma.Config(files=config.files, text_field="prompt", max_documents=1))[
        1
    ].payload.files[0].texts == ["first"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/notes.txt").write_text("x")
    with pytest.raises(ValueError, match="two files are named 'notes.txt'"):
        paloma.items(
            paloma.Config(files=[str(tmp_path / "notes.txt"), str(tmp_path / "sub/notes.txt")])
        )
    with pytest.raises(ValueError, match="is not a file"):
        paloma.items(paloma.Config(files=[str(tmp_path / "absent.txt")]))
    with pytest.raises(ValueError, match="either --data"):
        paloma.Config(data=str(tmp_path), files=["a"]).check()


def test_edited_data_gets_a_new_item_key(tmp_path) -> None:
    make_paloma(tmp_path)
    config = paloma.Config(data=str(tmp_path), slices=["ptb"])
    (before,) = paloma.items(config)
    write_jsonl_gz(tmp_path / "ptb/test/test.jsonl.gz", [{"text": "another text"}])
    (after,) = paloma.items(config)
    assert before.key[0] == after.key[0] == "ptb" and before.key != after.key


def test_hub_fallback_downloads_the_chosen_slices_or_says_how_to_proceed(
    tmp_path, monkeypatch
) -> None:
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, repo_type, allow_patterns):
        asked.update(repo_id=repo_id, repo_type=repo_type, patterns=allow_patterns)
        return str(make_paloma(tmp_path))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    (item,) = paloma.items(paloma.Config(slices=["ptb"]))
    assert asked == {
        "repo_id": "allenai/paloma",
        "repo_type": "dataset",
        "patterns": ["ptb/test/*"],
    }
    assert item.group == "ptb"

    def refuse(*args, **kwargs):
        raise OSError("401 gated")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ValueError, match="gated: accept its licence"):
        paloma.items(paloma.Config(slices=["ptb"]))


# --- end to end --------------------------------------------------------------------------------


def long_slices(root: Path) -> Path:
    """Two slices whose documents are several 16-token windows long."""
    words = ["Gaussian", "Beta", "Poisson", "Weibull", "Cauchy", "Laplace", "Gamma", "Pareto"]
    rng = np.random.default_rng(3)
    for name, count in (("wikitext_103", 3), ("ptb", 2)):
        docs = [{"text": " ".join(rng.choice(words, size=30 + 10 * i))} for i in range(count)]
        write_jsonl_gz(root / name / "test" / "part.jsonl.gz", docs)
    return root


def test_evaluate_end_to_end_with_an_adapter(model_dir, adapter_dir, tmp_path) -> None:
    data = long_slices(tmp_path / "paloma")
    shared = EvalConfig(
        model=str(model_dir),
        adapters=[str(adapter_dir)],
        output=str(tmp_path / "out"),
        progress=False,
    )
    config = paloma.Config(data=str(data), slices=["wikitext_103", "ptb"], window=16, stride=8)
    report = evaluate(shared, {"paloma": config})
    result = report["benchmarks"]["paloma"]
    assert list(result["checkpoints"]) == ["base", "soft-run"]
    for name, summary in result["checkpoints"].items():
        records = [r for r in result["items"] if r["checkpoint"] == name]
        assert sorted(r["slice"] for r in records) == ["ptb", "wikitext_103"]
        for record in records:
            assert (
                record["num_tokens"] > 3 * 16
            )  # longer than a window: several windows per document
            assert record["num_tokens"] == sum(f["num_tokens"] for f in record["files"])
        assert summary["num_tokens"] == sum(r["num_tokens"] for r in records)
        assert summary["bits_per_byte"] == pytest.approx(
            summary["total_nll"] / (math.log(2) * summary["num_bytes"])
        )
        assert summary["perplexity"] == pytest.approx(
            math.exp(summary["total_nll"] / summary["num_tokens"])
        )
    base, adapted = result["checkpoints"].values()
    assert base["total_nll"] != adapted["total_nll"]  # the adapter was applied
    markdown = (tmp_path / "out/report.md").read_text()
    assert "#### bits per byte by group" in markdown and "| wikitext_103 |" in markdown


def test_cli_with_user_files_and_cache(model_dir, tmp_path, capsys) -> None:
    story = tmp_path / "story.txt"
    story.write_text("Pick a random number from a Gaussian distribution. " * 4)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "Name a random city."}\n{"prompt": "The answer is -12.5e-3"}\n')
    out = tmp_path / "out"
    common = [
        "eval",
        "paloma",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--no-progress",
        "--window",
        "16",
        "--stride",
        "8",
    ]
    assert cli_main([*common, f"--files={story},{rows}"]) == 2
    assert "prompts.jsonl: the first row has no 'text' field" in capsys.readouterr().err
    assert cli_main([*common, f"--files={story},{rows}", "text_field=prompt", "--bos"]) == 2
    assert "no BOS" in capsys.readouterr().err  # the tiny tokenizer has none
    argv = [*common, f"files={story},{rows}", "text_field=prompt"]
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    records = {r["slice"]: r for r in report["benchmarks"]["paloma"]["items"]}
    assert set(records) == {"story.txt", "prompts.jsonl"}
    assert (
        records["story.txt"]["num_documents"] == 1
        and records["prompts.jsonl"]["num_documents"] == 2
    )
    cached = sorted((out / "cache/paloma/base").glob("*.json"))
    assert len(cached) == 2
    assert cli_main(argv) == 0  # served from the cache
    assert sorted((out / "cache/paloma/base").glob("*.json")) == cached
