"""The exactness checks of `calibft doctor`, on tiny random models of every supported family.

Each check returns one figure, compared with a tolerance stated per dtype in TOLERANCES (bf16
rounds every product to 8 bits of mantissa, so its tolerances are wider; they still fail the
planted errors of tests/test_doctor.py). docs/doctor.md says what each figure measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LONG_PROMPT = (
    "Generate exactly ONE random number from a Gaussian distribution with parameters mu=0.4, "
    "sigma=1.5. Output ONLY the number. You are a helpful assistant. Name a random city."
)
SAMPLES = 6000
CHI2_MIN_P = 1e-3
"""The sampler passes when the chi-square test's p-value is at least this..."""
CHI2_POWER_P = 1e-4
"""...and the same counts reject the model's law at temperature 1.5 below this (the test has
power: a sampler drawing from the wrong law fails)."""

TOLERANCES: dict[str, dict[str, float]] = {
    # max |exact - teacher-forced| sequence log-probability, nats
    "exact_pass": {"float32": 1e-4, "bfloat16": 0.25},
    # |fused - dense| / |dense| of the loss
    "fused_loss": {"float32": 1e-5, "bfloat16": 2e-2},
    # max over LoRA tensors of ||fused grad - dense grad|| / ||dense grad||
    "fused_grad": {"float32": 1e-4, "bfloat16": 5e-2},
    # the smaller chi-square p-value of the first and second sampled tokens: passes ABOVE this
    "sampler": {"float32": CHI2_MIN_P, "bfloat16": CHI2_MIN_P},
    # max |resumed - uninterrupted| / max |uninterrupted| over the adapter's tensors
    "train_resume": {"float32": 1e-5, "bfloat16": 1e-3},
}


@dataclass(frozen=True)
class Setup:
    """What every check of a run shares: the tiny tokenizer, its chat format, a trie, the device."""

    tokenizer: Any
    chat: Any
    trie: Any
    long_ids: list[int]
    device: torch.device


def setup(device: torch.device) -> Setup:
    from calibft.chat import ChatFormat
    from calibft.doctor.tiny import tiny_tokenizer
    from calibft.targets.numeric import build_output_space
    from calibft.targets.trie import TrieTokenizer, build_trie

    tokenizer = tiny_tokenizer()
    chat = ChatFormat.from_tokenizer(tokenizer)
    space = build_output_space("gaussian", {"mu": 0.0, "sigma": 1.0}, decimals=1, max_bins=40)
    trie = build_trie(space, TrieTokenizer.from_hf(tokenizer, chat))
    return Setup(tokenizer, chat, trie, chat.prompt_ids(LONG_PROMPT), device)


def model_of(s: Setup, family: str, dtype: str) -> Any:
    from calibft.doctor.tiny import family_model

    model: Any = family_model(s.tokenizer, family)
    return model.to(s.device, DTYPES[dtype])


@torch.no_grad()
def teacher_forced(model: Any, prompt_ids: list[int], rows: list[list[int]]) -> torch.Tensor:
    """float64 log-softmax of the model's plain forward over prompt + each row (right-padded:
    causal attention never reads the padding), [rows, len(prompt) + longest, V]."""
    width = len(prompt_ids) + max(len(r) for r in rows)
    batch = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(prompt_ids) + len(row)] = torch.tensor(prompt_ids + row)
    logits = model(batch.to(model.device)).logits
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def check_exact_pass(s: Setup, family: str, dtype: str) -> float:
    """The exact pass (tree attention over the whole trie) against teacher forcing of every value:
    the largest difference of a value's sequence log-probability."""
    import calibft

    model = model_of(s, family, dtype)
    offsets, ids = s.trie.value_paths()
    rows = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    logp = teacher_forced(model, s.long_ids, rows)
    start = len(s.long_ids) - 1
    expected = np.array(
        [sum(float(logp[i, start + k, t]) for k, t in enumerate(row)) for i, row in enumerate(rows)]
    )
    got = np.asarray(calibft.exact_logprobs(model, s.long_ids, s.trie), dtype=np.float64)
    return float(np.max(np.abs(got - expected)))


def _fused_and_dense(s: Setup, family: str, dtype: str) -> tuple[float, float, float]:
    """One padded batch through the training module's fused loss and through the dense loss on
    the model's own logits: (loss, dense loss, worst relative gradient difference)."""
    from calibft.losses import dense_sparse_kl
    from calibft.train.config import TrainConfig
    from calibft.train.data import DataPlan, ExampleBuilder
    from calibft.train.loop import check_model, trainable_module

    model = model_of(s, family, dtype)
    config = TrainConfig(method="soft", lora_dropout=0.0, lora_r=4, lora_alpha=8, chunk_size=5)
    config = dataclasses.replace(config, temperature=0.8, model=family)
    check_model(model, config)
    torch.manual_seed(0)
    module = trainable_module(model, config)
    prompts = [s.long_ids, s.chat.prompt_ids("Name a random city.")]
    plan = DataPlan(["gaussian", "gaussian"], 1, 0, 2, 1, 0, 1)
    builder = ExampleBuilder(config, prompts, [s.trie, s.trie], s.tokenizer.pad_token_id)
    batch = builder.batch(plan, 0, [0, 1])
    trainable = [p for p in module.parameters() if p.requires_grad]
    fused = module(*batch.inputs(s.device))
    fused.backward()
    fused_grads = [None if p.grad is None else p.grad.clone() for p in trainable]
    module.zero_grad(set_to_none=True)
    ids, mask = batch.input_ids.to(s.device), batch.attention_mask.to(s.device)
    logits = module.lm(input_ids=ids, attention_mask=mask).logits
    selected = logits.reshape(-1, logits.shape[-1])[batch.positions.to(s.device)]
    targets = batch.targets.to(s.device)
    dense = dense_sparse_kl(
        selected.float(), targets, batch.weights.to(s.device), temperature=config.temperature
    )
    dense.backward()
    worst = 0.0
    for got, p in zip(fused_grads, trainable, strict=True):
        if got is None or p.grad is None:  # adapters outside the text path (a vision tower)
            if (got is None) != (p.grad is None):
                raise RuntimeError("a LoRA tensor has a gradient in one loss and not the other")
            continue
        scale = float(p.grad.double().norm()) or 1.0
        worst = max(worst, float((got.double() - p.grad.double()).norm()) / scale)
    return fused.item(), dense.item(), worst


def check_fused_loss(s: Setup, family: str, dtype: str) -> tuple[float, float]:
    """(relative loss difference, worst relative gradient difference) of fused vs dense."""
    fused, dense, worst = _fused_and_dense(s, family, dtype)
    return abs(fused - dense) / abs(dense), worst


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit, categories expected fewer than 5 times pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    f_obs = np.append(counts[big], counts[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    keep = f_exp > 0
    return stats.chisquare(f_obs[keep], f_exp[keep] * f_obs[keep].sum() / f_exp[keep].sum()).pvalue


def check_sampler(s: Setup, family: str, dtype: str) -> float:
    """Sampled first tokens (from the prefill) and second tokens (one cached decoding step past the
    sliding window) against the model's next-token law and exact second-token marginal, by a
    chi-square test: the smaller of the two p-values. Raises when the same counts fail to reject
    the law at temperature 1.5 (the test would have no power)."""
    from calibft.doctor.tiny import WINDOW
    from calibft.lm.decode import prefill
    from calibft.lm.sample import sample_completions

    model = model_of(s, family, dtype)
    prompt_ids = s.long_ids[-(WINDOW + 8) :]
    drawn = sample_completions(
        model, prefill(model, prompt_ids), SAMPLES, seed=3, end_ids=[], max_new_tokens=2,
        batch_size=SAMPLES,
    )  # fmt: skip
    vocab = model.config.get_text_config().vocab_size
    first = np.bincount([d[0] for d in drawn], minlength=vocab)
    second = np.bincount([d[1] for d in drawn], minlength=vocab)
    logp = teacher_forced(model, prompt_ids, [[u] for u in range(vocab)])
    p_first = logp[0, len(prompt_ids) - 1].exp()
    # P(second = t) = sum_u P(first = u) P(t | prompt, u)
    p_second = p_first @ logp[:, len(prompt_ids)].exp()
    hotter = torch.softmax(torch.log(p_first) / 1.5, -1)
    power = chi_square_p(first, hotter.numpy())
    if power >= CHI2_POWER_P:
        raise RuntimeError(
            f"no power: the law at temperature 1.5 is not rejected (p = {power:.2g})"
        )
    return min(chi_square_p(first, p_first.numpy()), chi_square_p(second, p_second.numpy()))


def _train_config(model_dir: Path, output: Path, dtype: str) -> Any:
    from calibft.config import build
    from calibft.train.config import TrainConfig

    values: dict[str, Any] = dict(
        model=str(model_dir),
        output=str(output),
        families=["gaussian", "uniform"],
        prompts_per_family=2,
        decimals=1,
        max_bins=32,
        epochs=1,
        batch_size=2,  # 4 examples: 2 optimizer steps, a checkpoint after the first
        lora_r=4,
        lora_alpha=8,
        lr=1e-2,
        checkpoint_every=1,
        max_seq_len=128,
        dtype=dtype,
        mixed_precision="no" if dtype == "float32" else "bf16",
    )
    return build(TrainConfig, values)


def check_train_resume(s: Setup, family: str, dtype: str) -> float:
    """`calibft train` for two optimizer steps with a checkpoint after the first, then the same
    run resumed from that checkpoint: how far the resumed adapter is from the uninterrupted one
    (relative to its largest weight). Refuses a run whose adapter did not move."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from calibft.doctor.tiny import family_model
    from calibft.train.checkpoints import CHECKPOINT_DIR
    from calibft.train.loop import train

    root = Path(tempfile.mkdtemp(prefix="calibft-doctor-"))
    try:
        model_dir, whole, resumed = root / "model", root / "whole", root / "resumed"
        # accelerate keeps one process-wide state that refuses a second mixed-precision setting;
        # each run here is a fresh process as far as it is concerned. The progress bars and
        # checkpoint messages of the four runs would bury the doctor's lines.
        with contextlib.redirect_stderr(io.StringIO()):
            s.tokenizer.save_pretrained(model_dir)
            family_model(s.tokenizer, family).save_pretrained(model_dir)
            AcceleratorState._reset_state(reset_partial_state=True)
            train(_train_config(model_dir, whole, dtype))
            shutil.copytree(whole / CHECKPOINT_DIR, resumed / CHECKPOINT_DIR)
            AcceleratorState._reset_state(reset_partial_state=True)
            train(_train_config(model_dir, resumed, dtype), resume=True)
            AcceleratorState._reset_state(reset_partial_state=True)
        expected = load_file(str(whole / "adapter_model.safetensors"))
        got = load_file(str(resumed / "adapter_model.safetensors"))
        if got.keys() != expected.keys():
            raise RuntimeError("the resumed adapter's tensors are not the uninterrupted one's")
        if not any(float(t.abs().max()) > 0 for k, t in expected.items() if "lora_B" in k):
            raise RuntimeError("the adapter did not train (lora_B still zero)")
        scale = max(float(t.abs().max()) for t in expected.values())
        return max(float((got[k].double() - expected[k].double()).abs().max()) for k in got) / scale
    finally:
        shutil.rmtree(root, ignore_errors=True)


CHECKS: dict[str, Callable[[Setup, str, str], Any]] = {
    "exact_pass": check_exact_pass,
    "fused_loss": check_fused_loss,
    "sampler": check_sampler,
    "train_resume": check_train_resume,
}
"""Each check's function; `fused_loss` returns two figures (loss, then gradients)."""
AT_LEAST = frozenset({"sampler"})
"""Checks whose figure passes at or above its tolerance (the rest pass at or below it)."""
TRAIN_FAMILIES = ("llama", "gemma3_it")
"""train_resume runs end to end (seconds per run): on a plain decoder and on the multimodal
class with its vision tower."""
