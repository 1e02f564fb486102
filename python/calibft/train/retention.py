"""The retention term and retention tracking (docs/method.md §9).

Retention term: replay prompts (the shipped chat prompts and arithmetic word problems, or the
user's files), the base model's own greedy continuations of them, and at every position of those
continuations the base model's next-token distribution kept sparse: its top-k tokens and one
bucket for the rest of the mass. Continuations and targets are computed once, with the adapter
disabled (the base model itself, no second copy), cached in the run's output directory and
reused on resume. Every optimizer step adds a few replay examples to its last micro-batch;
`calibft.train.loop.CompletionLoss` runs them through the decoder and the fused kernel.

Retention tracking: bits per byte on a held-out text and greedy exact-match accuracy on held-out
arithmetic word problems, neither used for training or replay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibft.chat import ChatFormat
from calibft.files import atomic_write_bytes
from calibft.lm.decode import lm_head_logits
from calibft.lm.score import rolling_nll
from calibft.losses import default_chunk_size, example_weights
from calibft.train.config import TrainConfig
from calibft.train.data import Batch, _to_device, float_bits

CACHE_FILE = "retention_replay.pt"
CURVES_FILE = "training_curves.png"
GENERATION_BATCH = 16
# The arithmetic check's instruction; the answer is the last number of the reply.
ARITHMETIC_SUFFIX = " Answer with a short explanation, then the final number."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _shipped(name: str) -> str:
    return (
        resources.files("calibft")
        .joinpath("data")
        .joinpath("retention")
        .joinpath(name)
        .read_text("utf-8")
    )


def read_prompts(paths: Sequence[str]) -> list[str]:
    """Replay prompts: the shipped set when `paths` is empty, else every file's prompts in order
    (``.jsonl``: a "prompt" per line; anything else: one prompt per non-empty line)."""
    if not paths:
        return [json.loads(line)["prompt"] for line in _shipped("replay.jsonl").splitlines()]
    prompts: list[str] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"retention_data: {name!r} is not a file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, 1):
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(
                        f"retention_data: {name} line {number} needs a string field 'prompt'"
                    )
                prompts.append(row["prompt"])
        else:
            prompts.extend(lines)
    if not prompts:
        raise ValueError(f"retention_data: no prompts in {', '.join(paths)}")
    return prompts


# ----------------------------------------------------------------------------- replay set


@dataclass(frozen=True)
class ReplayExample:
    """One replay sequence: prompt + continuation ids, and at each of its L supervised positions
    (the last prompt token and every continuation token but the last) the base model's top-k
    tokens [L, k], their probabilities [L, k] and the rest of its mass [L]."""

    ids: Tensor
    tokens: Tensor
    probs: Tensor
    rest: Tensor


def replay_key(config: TrainConfig, prompts: Sequence[str], dtype: torch.dtype, device: str) -> str:
    """What the cached replay set depends on: model, prompts and settings, and the dtype and
    device kind the base model runs in (greedy decoding may differ between them)."""
    parts = [
        config.model,
        config.retention_top_k,
        config.retention_max_new_tokens,
        str(dtype),
        device,
        prompts,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_or_build_replay(
    config: TrainConfig, lm: Any, tokenizer: Any, output: Path, is_main: bool
) -> list[ReplayExample]:
    """The run's replay set: read from ``output/retention_replay.pt`` when its key matches, else
    computed with the adapter of `lm` (the peft model) disabled and written there by the main
    process. Other processes call it after the main one (``main_process_first``)."""
    prompts = read_prompts(config.retention_data)
    causal_lm = lm.get_base_model()
    device = next(causal_lm.parameters()).device
    key = replay_key(config, prompts, causal_lm.dtype, device.type)
    path = output / CACHE_FILE
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return [ReplayExample(**example) for example in cached["examples"]]
    chat = ChatFormat.from_tokenizer(tokenizer)
    prompt_ids = [chat.prompt_ids(prompt) for prompt in prompts]
    was_training = lm.training
    lm.eval()
    try:
        with lm.disable_adapter(), torch.random.fork_rng(devices=[]):
            continuations = greedy_continuations(
                causal_lm, prompt_ids, config.retention_max_new_tokens, chat.end_token_id
            )
            examples = base_targets(causal_lm, prompt_ids, continuations, config.retention_top_k)
    finally:
        lm.train(was_training)
    if is_main:
        buffer = io.BytesIO()
        state = {"key": key, "examples": [vars(example) for example in examples]}
        torch.save(state, buffer)
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    return examples


@torch.no_grad()
def greedy_continuations(
    causal_lm: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, end_id: int
) -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including the end-of-turn token (prompts
    batched, left-padded)."""
    device = next(causal_lm.parameters()).device
    out: list[list[int]] = []
    for first in range(0, len(prompt_ids), GENERATION_BATCH):
        group = prompt_ids[first : first + GENERATION_BATCH]
        width = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), width), end_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(group):
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            mask[row, width - len(ids) :] = 1
        generated = causal_lm.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=end_id,
            pad_token_id=end_id,
        )[:, width:].tolist()
        for ids in generated:
            stop = ids.index(end_id) + 1 if end_id in ids else len(ids)
            out.append(ids[:stop])
    return out


@torch.no_grad()
def base_targets(
    causal_lm: Any,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    top_k: int,
) -> list[ReplayExample]:
    """The sparse targets along each continuation: at every position, the top-k tokens of the
    model's next-token distribution and the exact rest of the mass (a logsumexp over the other
    tokens, not 1 - the top-k sum). Logits exist for one chunk of positions at a time."""
    device = next(causal_lm.parameters()).device
    examples = []
    for prompt, continuation in zip(prompt_ids, continuations, strict=True):
        ids = torch.as_tensor(list(prompt) + list(continuation[:-1]), dtype=torch.long)
        hidden = causal_lm.get_decoder()(input_ids=ids[None].to(device)).last_hidden_state[0]
        hidden = hidden[len(prompt) - 1 :]
        vocab = causal_lm.get_output_embeddings().weight.shape[0]
        k = min(top_k, vocab)
        step = default_chunk_size(len(hidden), vocab, cpu=device.type == "cpu")
        tokens, probs, rest = [], [], []
        for start in range(0, len(hidden), step):
            logp = lm_head_logits(causal_lm, hidden[start : start + step]).float()
            logp = logp.log_softmax(-1)
            top = logp.topk(k, dim=-1)
            rest.append(logp.scatter(1, top.indices, -math.inf).logsumexp(-1).exp())
            tokens.append(top.indices)
            probs.append(top.values.exp())
        examples.append(
            ReplayExample(
                ids=ids,
                tokens=torch.cat(tokens).cpu(),
                probs=torch.cat(probs).cpu(),
                rest=torch.cat(rest).cpu(),
            )
        )
    return examples


def replay_indices(
    num_examples: int, seed: int, step: int, rank: int, world_size: int, size: int
) -> list[int]:
    """The replay examples of one rank's optimizer step: the step's block of ``size *
    world_size`` slots of an endless stream of seeded permutations of the replay set, every
    world_size-th slot from ``rank`` on (so ranks share the examples as they do training
    examples, and a resumed run draws the same ones)."""
    out = []
    for i in range(size):
        slot = (step * size + i) * world_size + rank
        cycle, index = divmod(slot, num_examples)
        order = np.random.default_rng(np.random.SeedSequence([seed, cycle])).permutation(
            num_examples
        )
        out.append(int(order[index]))
    return out


@dataclass
class ReplayBatch(Batch):
    """A micro-batch with replay rows: their own padded inputs (a second decoder pass, so that
    neither set of rows is padded to the other's width), their supervised positions in the
    flattened replay rows, and their sparse targets (top-k + rest), weighted by the mean over
    each example's positions, then over the examples (docs/method.md §9)."""

    replay_input_ids: Tensor  # [R, T']
    replay_attention_mask: Tensor  # [R, T']
    replay_positions: Tensor  # [P']
    replay_offsets: Tensor  # [P'+1]
    replay_tokens: Tensor  # [E']
    replay_probs: Tensor  # [E']
    replay_rest: Tensor  # [P']
    replay_weights: Tensor  # [P']

    def inputs(self, device: torch.device) -> tuple[Any, ...]:
        """`Batch.inputs` and, last, the replay rows and targets (floats as bit patterns,
        offsets as a list, for the same reasons)."""
        replay = (
            _to_device(self.replay_input_ids, device),
            _to_device(self.replay_attention_mask, device),
            _to_device(self.replay_positions, device),
            self.replay_offsets.tolist(),
            _to_device(self.replay_tokens, device),
            _to_device(float_bits(self.replay_probs), device),
            _to_device(float_bits(self.replay_rest), device),
            _to_device(float_bits(self.replay_weights), device),
        )
        return (*super().inputs(device), replay)


def with_replay(batch: Batch, examples: Sequence[ReplayExample], pad_id: int) -> ReplayBatch:
    """`batch` with the replay `examples` as rows of their own (right-padded)."""
    width = max(len(example.ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    positions: list[int] = []
    for row, example in enumerate(examples):
        length, supervised = len(example.ids), len(example.rest)
        input_ids[row, :length] = example.ids
        attention_mask[row, :length] = 1
        positions.extend(range(row * width + length - supervised, row * width + length))
    lengths = [len(example.rest) for example in examples]
    k = examples[0].tokens.shape[1]
    return ReplayBatch(
        **{field.name: getattr(batch, field.name) for field in dataclasses.fields(Batch)},
        replay_input_ids=input_ids,
        replay_attention_mask=attention_mask,
        replay_positions=torch.tensor(positions, dtype=torch.long),
        replay_offsets=torch.arange(0, sum(lengths) * k + 1, k, dtype=torch.long),
        replay_tokens=torch.cat([example.tokens.reshape(-1) for example in examples]),
        replay_probs=torch.cat([example.probs.reshape(-1) for example in examples]),
        replay_rest=torch.cat([example.rest for example in examples]),
        replay_weights=example_weights(lengths).float(),
    )


# ----------------------------------------------------------------------------- tracking


class RetentionProbe:
    """Bits per byte on the shipped held-out text and greedy exact-match accuracy on the shipped
    held-out arithmetic word problems (neither is in the replay set)."""

    def __init__(self, tokenizer: Any, window: int):
        chat = ChatFormat.from_tokenizer(tokenizer)
        text = _shipped("heldout.txt")
        self.text_ids = tokenizer.encode(text, add_special_tokens=False)
        self.num_bytes = len(text.encode("utf-8"))
        problems = [json.loads(line) for line in _shipped("arithmetic_heldout.jsonl").splitlines()]
        self.prompt_ids = [chat.prompt_ids(p["question"] + ARITHMETIC_SUFFIX) for p in problems]
        self.answers = [p["answer"] for p in problems]
        self.end_id = chat.end_token_id
        self.tokenizer = tokenizer
        self.window = window

    @torch.no_grad()
    def measure(self, lm: Any, max_new_tokens: int = 48) -> dict[str, float]:
        """The figures of `lm` (the peft model, adapter on) in eval mode; its mode is restored."""
        was_training = lm.training
        lm.eval()
        try:
            causal_lm = lm.get_base_model()
            nll, _ = rolling_nll(
                causal_lm, self.text_ids, window=self.window, stride=max(1, self.window // 2)
            )
            replies = greedy_continuations(causal_lm, self.prompt_ids, max_new_tokens, self.end_id)
        finally:
            lm.train(was_training)
        correct = [
            final_number(self.tokenizer.decode(reply, skip_special_tokens=True)) == answer
            for reply, answer in zip(replies, self.answers, strict=True)
        ]
        return {
            "retention_bits_per_byte": nll / (math.log(2) * self.num_bytes),
            "retention_arithmetic_accuracy": sum(correct) / len(correct),
        }


def final_number(text: str) -> float | None:
    """The last number in `text` (thousands separators dropped), None when there is none."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def plot_curves(metrics_path: Path, path: Path) -> None:
    """Loss (calibration, and retention KL when trained) over steps, and on a twin axis the
    retention figures when tracked; written atomically."""
    from calibft.eval.figures import new_figure, save_figure

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig = new_figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for key, label in (("loss", "calibration loss"), ("retention_kl", "retention KL")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    lines, labels = ax.get_legend_handles_labels()
    tracked = [
        ("retention_bits_per_byte", "held-out bits per byte", "o-"),
        ("retention_arithmetic_accuracy", "arithmetic accuracy", "s--"),
    ]
    if any(key in r for key, _, _ in tracked for r in records):
        twin = ax.twinx()
        for key, label, style in tracked:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                twin.plot(
                    *zip(*points), style, label=label, color="tab:red" if "o" in style else "k"
                )
        twin.set_ylabel("retention figures")
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        ax.legend(lines, labels, loc="best", fontsize="small")
    save_figure(fig, path)
