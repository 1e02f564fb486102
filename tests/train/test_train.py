"""`calibft.train` on tiny local models (CPU, no hub): data plan, loss, end-to-end runs, resume,
DDP."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, torchrun
from transformers import AutoModelForCausalLM

import calibft.train.loop as tr
from calibft.config import build
from calibft.eval.report import format_value
from calibft.lm.adapters import add_lora, peft_wrapping
from calibft.lm.load import load_model_and_tokenizer
from calibft.losses import dense_sparse_kl
from calibft.train.checkpoints import peft_name
from calibft.train.config import TrainConfig, load_config
from calibft.train.data import (
    DataPlan,
    ExampleBuilder,
    balanced_order,
    bits_float,
    prepare_targets,
    rank_shard,
    select_prompts,
)
from calibft.train.loop import CompletionLoss, compare_with_base, train


def build_config(values):
    return build(TrainConfig, values)


def lora(model, cfg):
    return add_lora(
        model,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        targets=cfg.lora_targets,
        base_name=cfg.model,
    )


METRIC_FIELDS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}

# ----------------------------------------------------------------------------- helpers


def tiny_config(model_dir: Path, output: Path, **overrides):
    """A run of a few optimizer steps: 2 families x 3 prompts, 1-decimal values, small LoRA."""
    values = dict(
        model=str(model_dir),
        output=str(output),
        families="gaussian,uniform",
        prompts_per_family=3,
        decimals=1,
        max_bins=32,
        epochs=2,
        batch_size=2,  # 6 examples -> 3 steps per epoch, 6 in all
        lora_r=4,
        lora_alpha=8,
        lr=1e-2,
        checkpoint_every=2,
        max_seq_len=128,
    )
    values.update(overrides)
    return build_config(values)


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter_model.safetensors"))


def family_counts(families, prefix) -> Counter:
    return Counter(families[i] for i in prefix)


families_strategy = st.lists(st.sampled_from("abcde"), min_size=1, max_size=40)


# ----------------------------------------------------------------------------- data plan


@settings(max_examples=200, deadline=None)
@given(families=families_strategy, seed=st.integers(0, 2**32 - 1))
def test_balanced_order_is_round_robin_over_remaining_families(families, seed):
    order = balanced_order(families, np.random.default_rng(seed))
    assert sorted(order) == list(range(len(families)))  # a permutation
    sizes = Counter(families)
    # Exactly the implemented guarantee: round r holds one example of every family with more
    # than r examples.
    start = 0
    for r in range(max(sizes.values())):
        active = {f for f, n in sizes.items() if n > r}
        block = order[start : start + len(active)]
        assert sorted(families[i] for i in block) == sorted(active)
        start += len(active)
    assert start == len(order)
    # Prefix balance: a family that still has examples is never more than one behind any family.
    for k in range(len(order) + 1):
        counts = family_counts(families, order[:k])
        for f in sizes:
            if counts[f] < sizes[f]:
                assert all(counts[g] - counts[f] <= 1 for g in sizes), (k, counts)


def test_balanced_order_is_seeded_and_reshuffles():
    families = ["a"] * 5 + ["b"] * 5 + ["c"] * 3
    first = balanced_order(families, np.random.default_rng(1))
    assert first == balanced_order(families, np.random.default_rng(1))
    orders = [balanced_order(families, np.random.default_rng(s)) for s in range(30)]
    # Members of a family are shuffled, and the family order is redrawn between rounds.
    assert len({tuple(i for i in o if families[i] == "a") for o in orders}) > 1
    assert any([families[i] for i in o[:3]] != [families[i] for i in o[3:6]] for o in orders)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 40),
    world_size=st.integers(1, 9),
    data=st.data(),
)
def test_rank_shard_equal_sizes_and_covering(n, world_size, data):
    order = data.draw(st.permutations(list(range(n))))
    shards = [rank_shard(order, rank, world_size) for rank in range(world_size)]
    per_rank = math.ceil(n / world_size)
    assert [len(s) for s in shards] == [per_rank] * world_size
    together = [i for s in shards for i in s]
    assert set(together) == set(order)  # covering
    if n % world_size == 0:
        assert len(together) == len(set(together)) == n  # disjoint
    else:
        # Padding by wrap-around repeats only the fewest examples needed, each at most once more
        # than any other.
        counts = Counter(together)
        assert len(together) - n == per_rank * world_size - n
        assert max(counts.values()) - min(counts.values()) <= 1


@settings(max_examples=100, deadline=None)
@given(
    families=families_strategy,
    batch_size=st.integers(1, 5),
    grad_accum=st.integers(1, 3),
    world_size=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_data_plan_steps_match_counts(families, batch_size, grad_accum, world_size, epoch):
    plans = [
        DataPlan(list(families), 1, 7, batch_size, grad_accum, rank, world_size)
        for rank in range(world_size)
    ]
    for plan in plans:
        steps = plan.steps(epoch)
        assert len(steps) == plan.steps_per_epoch
        assert sum(len(m) for m in steps) == plan.micro_batches_per_epoch
        assert all(1 <= len(m) <= grad_accum for m in steps)
        assert all(1 <= len(b) <= batch_size for m in steps for b in m)
        assert [i for m in steps for b in m for i in b] == plan.local_examples(epoch)
    # Every rank takes the same number of steps (else DDP would hang) and together they cover the
    # data.
    assert len({p.steps_per_epoch for p in plans}) == 1
    assert set().union(*(p.local_examples(epoch) for p in plans)) == set(range(len(families)))
    # Sampling seeds do not depend on rank or world size.
    single = DataPlan(list(families), 1, 7, batch_size, grad_accum, 0, 1)
    assert all(p.example_seed(epoch, 3) == single.example_seed(epoch, 3) for p in plans)
    assert single.example_seed(epoch, 3) != single.example_seed(epoch + 1, 3)


def test_select_prompts_subsets_and_rejects_unknown_family(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path, prompts_per_family=2)
    prompts = select_prompts(cfg)
    assert [p.family for p in prompts] == ["gaussian", "gaussian", "uniform", "uniform"]
    assert len({p.prompt for p in prompts}) == 4
    with pytest.raises(ValueError, match="not training families"):
        select_prompts(tiny_config(model_dir, tmp_path, families="gaussian,nonsense"))


# ------------------------------------------------------------------------ loss on a fixed batch


def _components(model_dir: Path, tmp_path: Path, method: str, arch_dir: Path | None = None):
    cfg = tiny_config(
        arch_dir or model_dir, tmp_path, method=method, lora_dropout=0.0, batch_size=4
    )
    prompts = select_prompts(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    prompt_ids, tries = prepare_targets(cfg, tokenizer, prompts, False)
    plan = DataPlan([p.family for p in prompts], 1, cfg.seed, cfg.batch_size, 1, 0, 1)
    builder = ExampleBuilder(cfg, prompt_ids, tries, tokenizer.pad_token_id)
    module = CompletionLoss(lora(model, cfg), 1.0, 0)
    return cfg, plan, builder, module, tries


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["soft", "hard"])
def test_completion_loss_matches_full_logits(tmp_path, method, arch):
    """The fused loss over completion positions equals the loss computed from the LM's full logits,
    and the positions/targets are aligned with the tokens that follow them in the input."""
    arch_dir = tiny_model_dir(tmp_path, arch)
    cfg, plan, builder, module, tries = _components(arch_dir, tmp_path, method, arch_dir)
    examples = [0, 3, 5, 1]
    batch = builder.batch(plan, 0, examples)
    targets = batch.targets
    flat_ids = batch.input_ids.reshape(-1)
    offsets = targets.offsets.tolist()
    # Each example's completion: sampled path (ids) = the input tokens after the prompt + end token.
    start = 0
    for b, example in enumerate(examples):
        _, off, ids = tries[example].sample_paths(1, plan.example_seed(0, example))
        path = ids[off[0] : off[1]].tolist()
        pos = batch.positions[start : start + len(path)]
        assert flat_ids[pos[1:]].tolist() == path[:-1]  # position i predicts the token at i + 1
        assert pos[0].item() // batch.input_ids.shape[1] == b
        for j, token in enumerate(path):
            lo, hi = offsets[start + j], offsets[start + j + 1]
            toks, probs = targets.tokens[lo:hi].tolist(), targets.probs[lo:hi].tolist()
            assert token in toks and probs[toks.index(token)] > 0
            if method == "hard":
                assert toks == [token] and probs == [1.0]
            else:
                assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)
        start += len(path)
    assert start == len(batch.positions) == len(batch.weights)
    # Each example's weights sum to 1 / batch (per-sequence mean, then mean over the batch).
    assert torch.allclose(batch.weights.sum(), torch.tensor(1.0))

    args = batch.inputs(torch.device("cpu"))
    # Probabilities and weights travel as their float32 bits (no wrapper casts them to bf16).
    assert torch.equal(bits_float(args[5]), targets.probs.float())
    assert torch.equal(bits_float(args[6]), batch.weights)
    with torch.no_grad():
        got = module(*args)
        logits = module.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    selected = logits.reshape(-1, logits.shape[-1])[batch.positions]
    expected = dense_sparse_kl(selected, targets, batch.weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if method == "hard":
        path_tokens = targets.tokens.long()
        per_token = torch.nn.functional.cross_entropy(selected, path_tokens, reduction="none")
        torch.testing.assert_close(got, (per_token * batch.weights).sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_loss_decreases_on_fixed_batch(model_dir, tmp_path, method):
    torch.manual_seed(0)  # LoRA's init draws from the global generator: independent of test order
    cfg, plan, builder, module, _ = _components(model_dir, tmp_path, method)
    module.train()
    batch = builder.batch(plan, 0, plan.steps(0)[0][0])
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = tr._forward(module, batch, torch.device("cpu"))
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Steadily down (a random 2-layer model with attention-only LoRA plateaus near 5 nats, so the
    # drop is modest, but a wrong-signed or missing gradient would not give it).
    assert all(b <= a + 1e-4 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.15, losses
    # Only the adapter moved.
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def soft_run(model_dir, tmp_path_factory):
    """Uninterrupted soft run: 6 steps, checkpoints every 2 steps (reference for resume tests)."""
    output = tmp_path_factory.mktemp("soft")
    cfg = tiny_config(model_dir, output)
    assert train(cfg) == output
    return cfg, output


@pytest.fixture(scope="module")
def hard_run(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("hard")
    cfg = tiny_config(
        model_dir,
        output,
        method="hard",
        prompts_per_family=2,
        repeats=2,
        grad_accum=2,
        batch_size=1,
        checkpoint_every=1,
        keep_checkpoints=3,
        token_mean=True,
    )
    train(cfg)
    return cfg, output


def _check_output(cfg, output: Path, model_dir: Path, total_steps: int):
    names = {p.name for p in output.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.json",
        "metrics.jsonl",
    } <= names
    assert not [n for n in names if n.startswith(".")]  # no staging leftovers
    # The saved config is the resolved one and reloads to the same config.
    assert load_config(config_file=output / "train_config.json") == cfg
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == cfg.lora_r and adapter_config["lora_alpha"] == cfg.lora_alpha
    assert sorted(adapter_config["target_modules"]) == sorted(cfg.lora_targets)
    assert adapter_config["base_model_name_or_path"] == str(model_dir)
    tensors = adapter_tensors(output)
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert any(
        t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k
    )  # trained (B starts at 0)

    metrics = read_metrics(output)
    assert [m["step"] for m in metrics] == list(range(1, total_steps + 1))
    for m in metrics:
        assert set(m) == METRIC_FIELDS
        assert all(math.isfinite(m[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
        assert (
            m["loss"] > 0
            and m["grad_norm"] > 0
            and m["tokens_per_s"] > 0
            and 0 <= m["lr"] <= cfg.lr
        )
    assert max(m["lr"] for m in metrics) == pytest.approx(cfg.lr)
    assert metrics[-1]["lr"] < metrics[1]["lr"]  # cosine decay after warmup

    # Checkpoints: every checkpoint_every steps before the end, only the last keep_checkpoints kept.
    expected = [s for s in range(1, total_steps) if s % cfg.checkpoint_every == 0][
        -cfg.keep_checkpoints :
    ]
    found = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert found == [f"step-{s:08d}" for s in expected]

    # The adapter loads with PEFT onto the base model and changes its logits.
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with peft_wrapping():
        tuned = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), str(output)
        ).eval()
    loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    for key, tensor in tensors.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], tensor), key
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        diff = (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert diff > 1e-4


@pytest.mark.slow
def test_train_soft_end_to_end(soft_run, model_dir):
    cfg, output = soft_run
    _check_output(cfg, output, model_dir, total_steps=6)
    assert [m["epoch"] for m in read_metrics(output)] == [0, 0, 0, 1, 1, 1]
    # The adapter's README is calibft's model card, not peft's empty template.
    card = (output / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {model_dir}\n")
    assert "More Information Needed" not in card
    assert f"r={cfg.lora_r}, alpha={cfg.lora_alpha}" in card and "gaussian, uniform" in card
    assert (
        "PeftModel.from_pretrained" in card and "## Before / after" not in card
    )  # no comparison ran


@pytest.mark.slow
def test_train_hard_end_to_end(hard_run, model_dir):
    cfg, output = hard_run
    # 2 families x 2 prompts x 2 repeats = 8 examples; batch 1 x accumulation 2 -> 4 steps per
    # epoch.
    _check_output(cfg, output, model_dir, total_steps=8)


# ----------------------------------------------------------------------------- resume


class Interrupt(KeyboardInterrupt):
    pass


def _interrupted_run(monkeypatch, cfg, forward_calls: int):
    """Train until the ``forward_calls``-th micro-batch forward, then stop as Ctrl-C would."""
    real = tr._forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == forward_calls:
            raise Interrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tr, "_forward", forward)
        with pytest.raises(Interrupt):
            train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_in_step", [4, 6]
)  # resumes mid-epoch 0 (from step 2) and mid-epoch 1 (step 4)
def test_resume_equals_uninterrupted_soft(soft_run, model_dir, tmp_path, monkeypatch, stop_in_step):
    _, ref_output = soft_run
    output = tmp_path / "resumed"
    cfg = tiny_config(model_dir, output)
    _interrupted_run(monkeypatch, cfg, forward_calls=stop_in_step)  # 1 micro-batch per step
    last = (stop_in_step - 1) // 2 * 2
    assert sorted(p.name for p in (output / "checkpoints").iterdir())[-1] == f"step-{last:08d}"
    assert not (output / "adapter_model.safetensors").exists()
    assert [m["step"] for m in read_metrics(output)] == list(range(1, stop_in_step))

    # Restarting without --resume is refused; with it the run completes.
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(cfg)
    train(cfg, resume=True)

    got, expected = adapter_tensors(output), adapter_tensors(ref_output)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    metrics, ref_metrics = read_metrics(output), read_metrics(ref_output)
    assert [m["step"] for m in metrics] == list(range(1, 7))  # no duplicated or missing steps
    for m, r in zip(metrics, ref_metrics):
        assert (m["loss"], m["lr"], m["grad_norm"]) == (r["loss"], r["lr"], r["grad_norm"])


@pytest.mark.slow
def test_resume_equals_uninterrupted_hard_with_accumulation(
    hard_run, model_dir, tmp_path, monkeypatch
):
    ref_cfg, ref_output = hard_run
    output = tmp_path / "resumed"
    cfg = build_config({**ref_cfg.to_dict(), "output": str(output)})
    _interrupted_run(monkeypatch, cfg, forward_calls=2 * 5 + 2)  # second micro-batch of step 6
    assert [m["step"] for m in read_metrics(output)] == [1, 2, 3, 4, 5]
    train(cfg, resume=True)
    got, expected = adapter_tensors(output), adapter_tensors(ref_output)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [m["step"] for m in read_metrics(output)] == list(range(1, 9))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_other_lora_parameters(soft_run, model_dir, tmp_path):
    """The checkpoint's adapter keys must be exactly this run's trainable parameters: other
    targets are refused before any step, naming the mismatch, and nothing is touched."""
    _, ref_output = soft_run
    output = tmp_path / "other-targets"
    shutil.copytree(ref_output, output)
    with pytest.raises(
        ValueError,
        match=r"--resume: the adapter in .*step-00000004 does not match this run's LoRA "
        r"parameters \(missing none; unexpected base_model\.model\.model\.layers\.0\.self_attn"
        r"\.k_proj\.lora_A\.weight, .*\): resume with the model and lora_targets",
    ):
        train(tiny_config(model_dir, output, lora_targets="q_proj,v_proj,o_proj"), resume=True)
    assert read_metrics(output) == read_metrics(ref_output)
    assert adapter_tensors(output).keys() == adapter_tensors(ref_output).keys()


@pytest.mark.slow
def test_resume_without_checkpoint_starts_from_scratch(soft_run, model_dir, tmp_path):
    _, ref_output = soft_run
    output = tmp_path / "fresh"
    train(tiny_config(model_dir, output), resume=True)
    got, expected = adapter_tensors(output), adapter_tensors(ref_output)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if training gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error was raised")

    monkeypatch.setattr(tr, "load_model_and_tokenizer", refuse)


def test_missing_model_path(tmp_path, no_model_loading):
    with pytest.raises(ValueError, match="is not a model directory"):
        train(tiny_config(tmp_path / "no-such-model", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        train(tiny_config(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_lora_target(model_dir, tmp_path, no_model_loading):
    with pytest.raises(
        ValueError, match=r"lora_targets: c_attn not found .*its linear modules are .*q_proj"
    ):
        train(tiny_config(model_dir, tmp_path / "out", lora_targets="q_proj,c_attn"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_existing_checkpoints_without_resume(soft_run, model_dir, tmp_path, no_model_loading):
    _, ref_output = soft_run
    output = tmp_path / "out"
    shutil.copytree(ref_output, output)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(tiny_config(model_dir, output))
    # Nothing in the directory was touched.
    assert (output / "metrics.jsonl").read_text() == (ref_output / "metrics.jsonl").read_text()


def test_launcher_world_size_mismatch(model_dir, tmp_path, monkeypatch, no_model_loading):
    """torchrun without ACCELERATE_USE_CPU on a CPU machine: accelerate sees one process per rank;
    training must refuse rather than let every rank train alone into the same directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError,
        match="launched as 2 processes but accelerate runs 1; on CPU set ACCELERATE_USE_CPU=1",
    ):
        train(tiny_config(model_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_max_seq_len_too_small(model_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"max_seq_len: prompt \+ completion reach \d+ tokens, above max_seq_len=8"
    ):
        train(tiny_config(model_dir, tmp_path / "out", max_seq_len=8))


# ----------------------------------------------------------------------------- two processes (gloo)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_batch(model_dir, tmp_path, monkeypatch):
    """torchrun x 2 on CPU (gloo), batch 1 per rank == one process with batch 2 over the same
    examples; its checkpoint resumes in one process."""
    ddp_output = tmp_path / "ddp"
    common = dict(lora_dropout=0.0, checkpoint_every=2, epochs=2)
    args = [f"{k}={v}" for k, v in common.items()] + [
        "families=gaussian,uniform",
        "prompts_per_family=3",
        "decimals=1",
        "max_bins=32",
        "lora_r=4",
        "lora_alpha=8",
        "lr=1e-2",
        "max_seq_len=128",
        "batch_size=1",
    ]
    env = {
        **os.environ,
        # On a machine without GPUs accelerate runs one process per rank only when told to use the
        # CPU; `accelerate launch --cpu --num_processes 2` would start a single process (no MPI).
        "ACCELERATE_USE_CPU": "true",
        "CALIBFT_LOG_LEVEL": "DEBUG",
        "OMP_NUM_THREADS": "1",
    }
    cmd = torchrun(
        "-m",
        "calibft",
        "train",
        "--model",
        str(model_dir),
        "--output",
        str(ddp_output),
        "--preset",
        "paper-soft",
        *args,
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "6 steps on 2 process(es)" in proc.stderr

    # The two ranks trained on disjoint shards that cover every example, in every epoch.
    shards: dict[tuple[int, int], list[int]] = {}
    for epoch, rank, examples in re.findall(
        r"epoch (\d+) rank (\d+) examples \[([\d, ]*)\]", proc.stderr
    ):
        assert (int(epoch), int(rank)) not in shards
        shards[int(epoch), int(rank)] = [int(x) for x in examples.split(",")]
    assert sorted(shards) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in (0, 1):
        a, b = shards[epoch, 0], shards[epoch, 1]
        assert len(a) == len(b) == 3 and not set(a) & set(b) and set(a) | set(b) == set(range(6))

    # One adapter, one metrics line per global step.
    assert (ddp_output / "adapter_model.safetensors").is_file()
    assert not [p for p in ddp_output.iterdir() if p.name.startswith(".")]
    ddp_metrics = read_metrics(ddp_output)
    assert [m["step"] for m in ddp_metrics] == list(range(1, 7))

    # Gradients were averaged across ranks: same adapter as one process taking both ranks' examples
    # in each step (per-sequence mean over the batch, same example seeds).
    single = tmp_path / "single"
    train(tiny_config(model_dir, single, batch_size=2, **common))
    got, expected = adapter_tensors(ddp_output), adapter_tensors(single)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
    for m, r in zip(ddp_metrics, read_metrics(single)):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)

    # The checkpoint holds the adapter only, under peft's names (those of the final adapter).
    checkpoint = ddp_output / "checkpoints" / "step-00000004"
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert saved.keys() == got.keys()
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in saved)
    assert ".default." not in "".join(saved)

    # Resumed in one process with the same steps (1 process x batch 2): the LoRA tensors at the
    # start of the resumed run are the checkpoint's, bit for bit, and it ends where DDP ended.
    at_resume: dict[str, torch.Tensor] = {}
    real = tr.load_checkpoint

    def spy(accelerator, module, *args):
        step = real(accelerator, module, *args)
        for name, p in accelerator.unwrap_model(module).named_parameters():
            if p.requires_grad:
                at_resume[peft_name(name)] = p.detach().clone()
        assert step == 4
        return step

    monkeypatch.setattr(tr, "load_checkpoint", spy)
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_output, resumed)
    train(tiny_config(model_dir, resumed, batch_size=2, **common), resume=True)
    assert at_resume.keys() == saved.keys()
    assert all(torch.equal(at_resume[k], saved[k]) for k in saved)
    final = adapter_tensors(resumed)
    for key in got:
        torch.testing.assert_close(final[key], got[key], atol=1e-5, rtol=1e-4)
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, 7))

    # One process x batch 1 would take other steps: refused before any step, saying how.
    refused = tmp_path / "refused"
    shutil.copytree(ddp_output, refused)
    with pytest.raises(
        ValueError,
        match=r"--resume: .*step-00000004 was written by 2 process\(es\) with batch_size=1, "
        r"grad_accum=1; this run \(1 process\(es\), batch_size=1, grad_accum=1\) would take "
        r"other optimizer steps: resume with those settings",
    ):
        train(tiny_config(model_dir, refused, batch_size=1, **common), resume=True)
    assert read_metrics(refused) == ddp_metrics


@pytest.mark.slow
def test_compare_with_base_prints_the_report(soft_run, capsys):
    """The end-of-run headline table shows, per checkpoint, the figures written to
    eval/report.json; the eval_config file sets the benchmarks' keys."""
    cfg, output = soft_run
    settings = output.parent / "after-training.toml"
    settings.write_text('[structured]\nsplit = "ood"\nper_family = 1\nsamples = 3\nexact = false\n')
    cfg = build_config({**cfg.to_dict(), "eval": ["structured"], "eval_config": str(settings)})
    report = compare_with_base(cfg, output)
    table = capsys.readouterr().out
    saved = json.loads((output / "eval" / "report.json").read_text())
    assert saved == report
    result = report["benchmarks"]["structured"]
    assert set(result["checkpoints"]) == {"base", output.name}
    families = {record["family"] for record in result["items"]}
    assert (
        len(families) == 6 and len(result["items"]) == 12
    )  # one prompt per OOD family, 2 checkpoints
    assert report["config"]["structured"]["samples"] == 3
    card = (output / "README.md").read_text()
    assert "## Before / after" not in card  # compare_with_base alone does not rewrite the card
    for name, summary in result["checkpoints"].items():
        figures = summary["test_ood_family"]
        cells = [format_value(figures[k], 4) for k in ("valid_rate", "median_normalized_w1")]
        assert f"| {name} | {' | '.join(cells)} |" in table.splitlines()
