"""The training data: which prompts (numeric families and categorical targets), in which order, on
which rank, and the batches built from their tries (soft: sparse next-token targets along a
sampled path; hard: the path's tokens)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibft.chat import ChatFormat
from calibft.lm.load import load_tokenizer
from calibft.losses import SparseTargets, example_weights
from calibft.splits import PromptSpec, evenly_spaced, splits
from calibft.targets import Target, TrieTokenizer, build_spaces_and_tries
from calibft.targets.categorical import check_answers, load_target_files
from calibft.train.config import TrainConfig


def select_prompts(config: TrainConfig) -> list[PromptSpec]:
    """The numeric training prompts: the full-grid train split, optionally fewer families / prompts
    (evenly spaced over each family's grid, endpoints included, so a subset spans its parameters).
    With categorical targets and no families named there are none; ``families=all`` keeps all."""
    train = splits("full_grid")["train"]
    known = sorted({spec.family for spec in train})
    if config.families == ["all"] or not (config.families or config.targets):
        wanted = known
    else:
        wanted = config.families
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(
            f"families: {', '.join(unknown)} not training families; "
            f"choose from {', '.join(known)} or all"
        )
    chosen = [spec for family in wanted for spec in train if spec.family == family]
    return evenly_spaced(chosen, config.prompts_per_family, group=lambda spec: spec.family)


def select_targets(config: TrainConfig) -> list[Target]:
    """Every training prompt: the numeric ones (`select_prompts`), then the categorical targets of
    ``config.targets``, at most ``prompts_per_family`` evenly spaced ones per group. Target files
    are read and validated here (docs/targets.md), before any model is loaded."""
    numeric = [Target.of(spec) for spec in select_prompts(config)]
    categorical = load_target_files(config.targets)
    return numeric + evenly_spaced(categorical, config.prompts_per_family, group=lambda t: t.group)


def check_categorical(config: TrainConfig, targets: list[Target]) -> None:
    """The categorical targets' tokenizer checks (end-of-turn token inside an answer, prompt +
    answer over max_seq_len, ...): they need the tokenizer, not the weights."""
    if any(t.is_categorical for t in targets):
        check_answers(targets, load_tokenizer(config.model), max_seq_len=config.max_seq_len)


def balanced_order(families: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Family-balanced order of example indices (docs/method.md §7).

    Each family's examples are shuffled; then, round after round, one example is taken from every
    family that still has some, visiting those families in a fresh random order each round.
    """
    groups: dict[str, list[int]] = {}
    for index, family in enumerate(families):
        groups.setdefault(family, []).append(index)
    queues = [list(rng.permutation(members)) for _, members in sorted(groups.items())]
    order: list[int] = []
    while queues:
        for j in rng.permutation(len(queues)):
            order.append(int(queues[j].pop()))
        queues = [queue for queue in queues if queue]
    return order


def rank_shard(order: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Every world_size-th example from ``rank`` on, after padding ``order`` by wrap-around so
    that every rank gets the same number of examples."""
    # Wrap around as often as needed: with fewer examples than ranks, a single pass is not enough.
    padded = [order[i % len(order)] for i in range(-(-len(order) // world_size) * world_size)]
    return padded[rank::world_size]


@dataclass(frozen=True)
class DataPlan:
    """Which example every micro-batch of every epoch holds, on this rank."""

    families: list[str]  # family (or group) of each example; example i is prompt i // repeats
    repeats: int
    seed: int
    batch_size: int
    grad_accum: int
    rank: int
    world_size: int

    @classmethod
    def for_run(
        cls, config: TrainConfig, prompts: Sequence[Target | PromptSpec], rank: int, world_size: int
    ) -> DataPlan:
        """The plan of a run: every prompt ``config.repeats`` times, this rank's share. A
        categorical target's group plays the part of a family in the balanced order."""
        groups = [Target.of(prompt).group for prompt in prompts]
        return cls(
            families=[group for group in groups for _ in range(config.repeats)],
            repeats=config.repeats,
            seed=config.seed,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            rank=rank,
            world_size=world_size,
        )

    def local_examples(self, epoch: int) -> list[int]:
        order = balanced_order(self.families, np.random.default_rng(self.seed + epoch))
        return rank_shard(order, self.rank, self.world_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.families) / self.world_size) / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def steps(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a list of micro-batches of example indices."""
        examples = self.local_examples(epoch)
        micro = [
            examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)
        ]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]

    def signature(self, epochs: int, token_mean: bool) -> str:
        """A digest of what every optimizer step of the run trains on, over all ranks: the
        examples and the weight each gets in the step's loss (gradients are averaged over ranks
        and micro-batches, then over each micro-batch's examples; with ``token_mean``, over its
        tokens, so the micro-batches themselves count). Two plans with equal signatures take the
        same optimizer steps, whatever their world size."""
        digest = hashlib.sha256()
        ranks = [dataclasses.replace(self, rank=r) for r in range(self.world_size)]
        for epoch in range(epochs):
            for step in zip(*(plan.steps(epoch) for plan in ranks), strict=True):
                items: list[tuple[Any, Any]]
                if token_mean:
                    items = sorted(
                        (tuple(sorted(mb)), self.world_size * len(micro))
                        for micro in step
                        for mb in micro
                    )
                else:
                    items = sorted(
                        (e, Fraction(1, self.world_size * len(micro) * len(mb)))
                        for micro in step
                        for mb in micro
                        for e in mb
                    )
                digest.update(repr(items).encode() + b";")
            digest.update(b"|")
        return digest.hexdigest()

    def example_seed(self, epoch: int, example: int) -> int:
        """The sampling seed of one example: independent of rank, world size and resumption."""
        return int(
            np.random.SeedSequence([self.seed, epoch, example]).generate_state(1, np.uint64)[0]
        )


@dataclass
class Batch:
    """One micro-batch: padded inputs and the sparse targets at its completion positions."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    positions: Tensor  # [P] flat indices into B*T: where each completion token is predicted
    weights: Tensor  # [P]
    targets: SparseTargets
    num_tokens: int

    def inputs(self, device: torch.device) -> tuple[Any, ...]:
        """The arguments of ``CompletionLoss.forward``, on ``device``.

        The float32 target probabilities and position weights travel as their int32 bit
        patterns: FSDP's mixed precision casts every floating forward input to bf16, which would
        round the targets (up to 0.2 %). The CSR offsets travel as a list, which DDP and FSDP
        leave on the host: chunk boundaries are then read without a device synchronization.
        """
        return (
            _to_device(self.input_ids, device),
            _to_device(self.attention_mask, device),
            _to_device(self.positions, device),
            self.targets.offsets.tolist(),
            _to_device(self.targets.tokens, device),
            _to_device(float_bits(self.targets.probs), device),
            _to_device(float_bits(self.weights), device),
        )


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host-to-device copy that does not stall the host on CUDA (from pinned memory)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def float_bits(values: Tensor) -> Tensor:
    """float32 values as int32 bit patterns (`bits_float` undoes it exactly)."""
    return values.to(torch.float32).contiguous().view(torch.int32)


def bits_float(bits: Tensor) -> Tensor:
    return bits.view(torch.float32)


class ExampleBuilder:
    """Turns example indices into batches: samples a completion path from the prompt's trie and
    reads its next-token targets (soft) or its tokens (hard)."""

    def __init__(
        self, config: TrainConfig, prompt_ids: list[list[int]], tries: list[Any], pad_id: int
    ):
        self.config = config
        self.prompt_ids = prompt_ids
        self.tries = tries
        self.pad_id = pad_id

    def batch(self, plan: DataPlan, epoch: int, examples: Sequence[int]) -> Batch:
        rows, parts, lengths = [], [], []
        for example in examples:
            prompt = example // plan.repeats
            _, offsets, ids = self.tries[prompt].sample_paths(1, plan.example_seed(epoch, example))
            path = ids[offsets[0] : offsets[1]]
            if self.config.method == "soft":
                parts.append(self.tries[prompt].targets_along(path))
            else:
                parts.append((np.arange(len(path) + 1), path, np.ones(len(path))))
            # The model reads the prompt and the path without its end token, and predicts every
            # path token from the position before it.
            rows.append(self.prompt_ids[prompt] + path[:-1].tolist())
            lengths.append(len(path))
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions: list[int] = []
        for b, (row, length) in enumerate(zip(rows, lengths)):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
            first = len(row) - length  # the last prompt token
            positions.extend(range(b * width + first, b * width + len(row)))
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            positions=torch.tensor(positions, dtype=torch.long),
            weights=example_weights(lengths, token_mean=self.config.token_mean).float(),
            targets=SparseTargets.from_csr(parts),
            num_tokens=int(attention_mask.sum()),
        )


def prepare_targets(
    config: TrainConfig, tokenizer: Any, prompts: Sequence[Target | PromptSpec], is_main: bool
) -> tuple[list[list[int]], list[Any]]:
    """Each prompt's chat-templated ids and trie; ValueError if a prompt + completion exceeds
    max_seq_len or the chat template's end merges with an answer."""
    chat = ChatFormat.from_tokenizer(tokenizer)
    trie_tokenizer = TrieTokenizer.from_hf(tokenizer, chat)
    _, tries = build_spaces_and_tries(
        prompts,
        trie_tokenizer,
        decimals=config.decimals,
        max_bins=config.max_bins,
        keep_spaces=False,
        progress=is_main,
    )
    prompt_ids = [chat.prompt_ids(spec.prompt) for spec in prompts]
    longest = max(len(ids) + int(trie.depths().max()) - 1 for ids, trie in zip(prompt_ids, tries))
    if longest > config.max_seq_len:
        raise ValueError(
            f"max_seq_len: prompt + completion reach {longest} tokens, above "
            f"max_seq_len={config.max_seq_len}"
        )
    _, offsets, ids = tries[0].sample_paths(1, config.seed)
    trie_tokenizer.check_prompt_prefix(
        prompts[0].prompt, prompt_ids[0], ids[offsets[0] : offsets[1]]
    )
    return prompt_ids, tries
