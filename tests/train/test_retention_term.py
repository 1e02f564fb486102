"""The retention term (issue 21): the fused kernel's "other" bucket, the replay set and its cache,
the KL against the adapter-disabled model, lambda = 0, resume and DDP with lambda > 0, and the
retention tracking written to metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_models import torchrun

import calibft.train.loop as tr
import calibft.train.retention as ret
from calibft.config import build
from calibft.lm.load import load_model_and_tokenizer
from calibft.losses import SparseTargets, dense_sparse_kl, fused_sparse_kl
from calibft.train.config import TrainConfig
from calibft.train.data import DataPlan, ExampleBuilder, prepare_targets, select_prompts
from calibft.train.loop import train, trainable_module
from calibft.train.retention import (
    CACHE_FILE,
    CURVES_FILE,
    final_number,
    load_or_build_replay,
    read_prompts,
    replay_indices,
    with_replay,
)

REPLAY_PROMPTS = ["Say hello.", "What is 2 plus 3?", "Name a colour.", "Count to four."]


def config(model_dir: Path, output: Path, replay_file: Path | None = None, **overrides):
    """6 optimizer steps (2 families x 3 prompts, batch 2, 2 epochs), short replay continuations."""
    values = dict(
        model=str(model_dir),
        output=str(output),
        families="gaussian,uniform",
        prompts_per_family=3,
        decimals=1,
        max_bins=32,
        epochs=2,
        batch_size=2,
        lora_r=4,
        lora_alpha=8,
        lr=1e-2,
        checkpoint_every=2,
        max_seq_len=128,
        retention_max_new_tokens=5,
        retention_top_k=8,
    )
    if replay_file is not None:
        values["retention_data"] = [str(replay_file)]
    values.update(overrides)
    return build(TrainConfig, values)


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "replay.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in REPLAY_PROMPTS))
    return path


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    got, expected = adapter(a), adapter(b)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- kernel


def bucket_kl(base_logits, model_logits, k):
    """Dense reference: KL between base and model over the base's top-k tokens + one bucket."""
    logp, logs = base_logits.log_softmax(-1), model_logits.log_softmax(-1)
    top = logp.topk(k, dim=-1).indices
    listed_p, listed_s = logp.gather(1, top), logs.gather(1, top)
    off_p = logp.scatter(1, top, -torch.inf).logsumexp(-1)
    off_s = logs.scatter(1, top, -torch.inf).logsumexp(-1)
    rest = off_p.exp()
    bucket = torch.where(rest > 0, rest * (off_p - off_s), 0.0)
    return (listed_p.exp() * (listed_p - listed_s)).sum(-1) + bucket


def sparse_top_k(base_logits, k):
    logp = base_logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    rest = logp.scatter(1, top.indices, -torch.inf).logsumexp(-1).exp()
    n = base_logits.shape[0]
    return SparseTargets(
        torch.arange(0, n * k + 1, k), top.indices.reshape(-1), top.values.exp().reshape(-1), rest
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 40),
    softcap=st.sampled_from([None, 2.0]),
    temperature=st.sampled_from([1.0, 0.7]),
    chunk=st.sampled_from([None, 2]),
)
def test_other_bucket_value_and_gradients_equal_dense(seed, k, softcap, temperature, chunk):
    gen = torch.Generator().manual_seed(seed)
    num, width, vocab = 5, 6, 40
    hidden = torch.randn(num, width, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=torch.float64, generator=gen, requires_grad=True)
    base = torch.randn(num, vocab, dtype=torch.float64, generator=gen) * 2
    targets = sparse_top_k(base, k)
    weights = torch.rand(num, dtype=torch.float64, generator=gen)
    got = fused_sparse_kl(
        hidden, weight, targets, weights, softcap=softcap, temperature=temperature, chunk_size=chunk
    )
    z = hidden @ weight.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = (bucket_kl(base, z / temperature, k) * weights).sum()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, dense_sparse_kl(z, targets, weights, temperature=temperature))
    for g, e in zip(
        torch.autograd.grad(got, (hidden, weight)),
        torch.autograd.grad(expected, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_other_bucket_is_the_full_kl_at_full_vocabulary_and_below_it_otherwise():
    gen = torch.Generator().manual_seed(1)
    base, model = torch.randn(4, 30, generator=gen) * 3, torch.randn(4, 30, generator=gen) * 3
    full = (base.softmax(-1) * (base.log_softmax(-1) - model.log_softmax(-1))).sum(-1)
    weights = torch.ones(4, dtype=torch.float64)
    whole = dense_sparse_kl(model.double(), sparse_top_k(base.double(), 30), weights)
    torch.testing.assert_close(whole.float(), full.sum(), rtol=1e-5, atol=1e-6)
    for k in (1, 5, 29):  # merging tokens into one bucket can only lower a KL (data processing)
        assert dense_sparse_kl(model.double(), sparse_top_k(base.double(), k), weights) < whole


# ----------------------------------------------------------------------------- replay set


def test_read_prompts_shipped_jsonl_text_and_errors(tmp_path):
    shipped = read_prompts([])
    assert 100 <= len(shipped) <= 200 and len(set(shipped)) == len(shipped)
    held_out = [
        json.loads(line)["question"]
        for line in (Path(ret.__file__).parents[1] / "data" / "retention")
        .joinpath("arithmetic_heldout.jsonl")
        .read_text()
        .splitlines()
    ]
    assert not {q + ret.ARITHMETIC_SUFFIX for q in held_out} & set(shipped)
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\n two \n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "three"}\n')
    assert read_prompts([str(text), str(jsonl)]) == ["one", " two ", "three"]
    jsonl.write_text('{"text": "three"}\n')
    with pytest.raises(ValueError, match="p.jsonl line 1 needs a string field 'prompt'"):
        read_prompts([str(jsonl)])
    with pytest.raises(ValueError, match="is not a file"):
        read_prompts([str(tmp_path / "missing.jsonl")])


def test_retention_data_needs_a_weight(model_dir, tmp_path, replay_file):
    with pytest.raises(ValueError, match="retention_data applies only with retention_weight > 0"):
        config(model_dir, tmp_path, replay_file)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 9),
    world=st.integers(1, 3),
    size=st.integers(1, 3),
    step=st.integers(0, 20),
    seed=st.integers(0, 99),
)
def test_replay_indices_split_the_stream_over_ranks(n, world, size, step, seed):
    # The ranks of a step together take the slots one process with size * world takes.
    together = replay_indices(n, seed, step, 0, 1, size * world)
    per_rank = [replay_indices(n, seed, step, r, world, size) for r in range(world)]
    assert sorted(together) == sorted(i for rank in per_rank for i in rank)
    # Every cycle of the stream is a permutation: the first n slots hold every example once.
    stream = [i for s in range(n) for i in replay_indices(n, seed, s, 0, 1, 1)]
    assert sorted(stream) == list(range(n))


def test_replay_cache_is_reused_and_keyed(model_dir, tmp_path, replay_file, monkeypatch):
    cfg = config(model_dir, tmp_path, replay_file, retention_weight=1.0)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    module = trainable_module(model, cfg)
    first = load_or_build_replay(cfg, module.lm, tokenizer, tmp_path, True)
    assert (tmp_path / CACHE_FILE).is_file() and len(first) == len(REPLAY_PROMPTS)
    for example in first:
        length = len(example.rest)
        assert 1 <= length <= cfg.retention_max_new_tokens
        assert example.tokens.shape == example.probs.shape == (length, cfg.retention_top_k)
        torch.testing.assert_close(example.probs.sum(-1) + example.rest, torch.ones(length))
    with monkeypatch.context() as patch:
        patch.setattr(ret, "greedy_continuations", lambda *a: pytest.fail("regenerated"))
        again = load_or_build_replay(cfg, module.lm, tokenizer, tmp_path, True)
    assert all(torch.equal(a.probs, b.probs) for a, b in zip(first, again, strict=True))
    # Other settings: rebuilt, not read.
    other = config(model_dir, tmp_path, replay_file, retention_weight=1.0, retention_top_k=3)
    assert load_or_build_replay(other, module.lm, tokenizer, tmp_path, True)[0].tokens.shape[1] == 3


# ----------------------------------------------------------------------------- the KL term


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_retention_kl_equals_dense_against_the_adapter_disabled_model(
    model_dir, tmp_path, replay_file, method
):
    cfg = config(model_dir, tmp_path, replay_file, method=method, retention_weight=1.0)
    cfg.lora_dropout = 0.0
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    prompts = select_prompts(cfg)
    prompt_ids, tries = prepare_targets(cfg, tokenizer, prompts, False)
    module = trainable_module(model, cfg)
    torch.manual_seed(3)  # an adapter far from zero: model and base differ
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    replay = load_or_build_replay(cfg, module.lm, tokenizer, tmp_path, True)
    plan = DataPlan.for_run(cfg, prompts, 0, 1)
    builder = ExampleBuilder(cfg, prompt_ids, tries, tokenizer.pad_token_id)
    batch = builder.batch(plan, 0, [0, 4])
    chosen = [replay[i] for i in (2, 0, 3)]
    merged = with_replay(batch, chosen, builder.pad_id)
    loss, retention = module(*merged.inputs(torch.device("cpu")))
    # The calibration loss is that of the batch alone.
    torch.testing.assert_close(loss, module(*batch.inputs(torch.device("cpu"))))

    # Dense: full logits of each replay sequence with the adapter on and off.
    expected = torch.zeros((), dtype=torch.float64)
    for example in chosen:
        ids = example.ids[None]
        length = len(example.rest)
        with torch.no_grad(), module.lm.disable_adapter():
            base = module.lm(input_ids=ids).logits[0, -length:].double()
        logits = module.lm(input_ids=ids).logits[0, -length:].double()
        expected = expected + bucket_kl(base, logits, cfg.retention_top_k).mean() / len(chosen)
    torch.testing.assert_close(retention.double(), expected, rtol=1e-5, atol=1e-5)
    trainable = [p for p in module.parameters() if p.requires_grad]
    dense_grads = torch.autograd.grad(expected, trainable)
    fused_grads = torch.autograd.grad(retention, trainable)
    for f, d in zip(fused_grads, dense_grads, strict=True):
        torch.testing.assert_close(f.double(), d.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- training runs


def test_lambda_zero_and_tracking_leave_the_adapter_unchanged(model_dir, tmp_path):
    """λ = 0 builds no replay set; retention tracking (eval mode, greedy) does not perturb
    training: the adapter equals an untracked run's bit for bit."""
    plain, tracked = tmp_path / "plain", tmp_path / "tracked"
    train(config(model_dir, plain, checkpoint_every=0))
    train(config(model_dir, tracked, checkpoint_every=0, retention_eval_every=4))
    assert_same_adapter(plain, tracked)
    assert not (plain / CACHE_FILE).exists()
    assert all("retention_kl" not in m for m in metrics(plain))
    figures = [m for m in metrics(tracked) if "retention_bits_per_byte" in m]
    assert [m["step"] for m in figures] == [0, 4, 6]
    assert all(m["retention_bits_per_byte"] > 0 for m in figures)
    assert all(0 <= m["retention_arithmetic_accuracy"] <= 1 for m in figures)
    assert figures[0]["retention_bits_per_byte"] != figures[-1]["retention_bits_per_byte"]
    assert (tracked / CURVES_FILE).stat().st_size > 0


@pytest.fixture(scope="module")
def retention_run(model_dir, replay_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("retention")
    train(config(model_dir, output, replay_file, retention_weight=2.0))
    return output


def test_lambda_positive_logs_both_terms_and_changes_the_adapter(
    retention_run, model_dir, replay_file, tmp_path
):
    logged = metrics(retention_run)
    assert [m["step"] for m in logged] == list(range(1, 7))
    assert all(m["loss"] > 0 and m["retention_kl"] > -1e-6 for m in logged)
    assert logged[-1]["retention_kl"] > 1e-6  # the adapter moved the model off the base
    plain = tmp_path / "plain"
    train(config(model_dir, plain))
    assert [m["loss"] for m in metrics(plain)][0] == logged[0]["loss"]  # same first batch
    with_term, without = adapter(retention_run), adapter(plain)
    assert any(not torch.equal(with_term[k], without[k]) for k in without)


@pytest.mark.slow
def test_resume_with_retention_equals_uninterrupted(
    retention_run, model_dir, replay_file, tmp_path, monkeypatch
):
    output = tmp_path / "resumed"
    cfg = config(model_dir, output, replay_file, retention_weight=2.0)
    real, calls = tr._forward, {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in step 4: resumes from the checkpoint of step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tr, "_forward", forward)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    cached = (output / CACHE_FILE).stat().st_mtime_ns
    train(cfg, resume=True)
    assert (output / CACHE_FILE).stat().st_mtime_ns == cached  # the cache was reused
    assert_same_adapter(output, retention_run)
    assert [(m["loss"], m["retention_kl"]) for m in metrics(output)] == [
        (m["loss"], m["retention_kl"]) for m in metrics(retention_run)
    ]


@pytest.mark.slow
def test_two_process_ddp_with_retention_matches_one_process(model_dir, replay_file, tmp_path):
    """torchrun x 2 on CPU (gloo), batch 1 and 1 replay example per rank == one process with
    batch 2 and 2 replay examples: the ranks split the same replay slots."""
    common = dict(lora_dropout=0.0, checkpoint_every=0, retention_weight=2.0)
    single = tmp_path / "single"
    train(config(model_dir, single, replay_file, retention_batch_size=2, **common))
    ddp = tmp_path / "ddp"
    values = config(model_dir, ddp, replay_file, batch_size=1, retention_batch_size=1, **common)
    overrides = [
        f"{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in values.to_dict().items()
        if k not in ("model", "output") and v not in ([], None)
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = torchrun(
        "-m",
        "calibft",
        "train",
        "--model",
        str(model_dir),
        "--output",
        str(ddp),
        *overrides,
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, expected = adapter(ddp), adapter(single)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    for m, r in zip(metrics(ddp), metrics(single), strict=True):
        assert m["retention_kl"] == pytest.approx(r["retention_kl"], rel=1e-4, abs=1e-7)


def test_final_number():
    assert final_number("3 boxes of 4 make 12.") == 12
    assert final_number("That is 1,250 stamps") == 1250
    assert final_number("no idea") is None


def test_categorical_targets_with_retention(model_dir, replay_file, tmp_path):
    targets = tmp_path / "colours.jsonl"
    rows = [
        {"prompt": "Pick a colour: red or blue.", "targets": ["red", "blue"], "group": "colour"},
        {"prompt": "Name a pet: cat or dog.", "targets": ["cat", "dog"], "group": "pet"},
    ]
    targets.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    cfg = config(
        model_dir, output, replay_file, families=[], targets=[str(targets)], retention_weight=1.0
    )
    train(cfg)
    logged = metrics(output)
    assert len(logged) == 2 and all(m["retention_kl"] > -1e-6 for m in logged)
