"""Calibration fine-tuning: LoRA on a frozen causal LM with soft (trie KL) or hard (CE) targets.

One loop, readable top to bottom (``train``). It runs unchanged on one CPU or under
``accelerate launch`` (DDP or FSDP): every rank plans the same family-balanced order per epoch
and takes every world_size-th example of it (SPEC §7).

Examples are drawn deterministically from (seed, epoch, example index), so a run resumed from a
checkpoint (adapter, optimizer, scheduler, RNG states, step) ends with the same adapter as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from calibft.config import CONFIG_FILE, TrainConfig
from calibft.files import atomic_write_text
from calibft.losses import SparseTargets, example_weights, fused_sparse_kl
from calibft.splits import PromptSpec, splits

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- data plan


def select_prompts(config: TrainConfig) -> list[PromptSpec]:
    """The training prompts: the full-grid train split, optionally fewer families / prompts."""
    train = splits("full_grid")["train"]
    known = sorted({spec.family for spec in train})
    unknown = sorted(set(config.families) - set(known))
    if unknown:
        raise ValueError(f"families: {', '.join(unknown)} not training families; choose from {', '.join(known)}")
    chosen = []
    for family in config.families or known:
        specs = [spec for spec in train if spec.family == family]
        if config.prompts_per_family and config.prompts_per_family < len(specs):
            # Evenly spaced over the grid, endpoints included, so the subset spans its parameters.
            keep = np.linspace(0, len(specs) - 1, config.prompts_per_family).round().astype(int)
            specs = [specs[i] for i in keep]
        chosen.extend(specs)
    return chosen


def balanced_order(families: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Family-balanced order of example indices (SPEC §7).

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

    families: list[str]  # family of each example; example i is prompt i // repeats
    repeats: int
    seed: int
    batch_size: int
    grad_accum: int
    rank: int
    world_size: int

    @classmethod
    def for_run(cls, config: TrainConfig, prompts: Sequence[PromptSpec], rank: int, world_size: int) -> DataPlan:
        """The plan of a run: every prompt ``config.repeats`` times, this rank's share."""
        return cls(
            families=[spec.family for spec in prompts for _ in range(config.repeats)],
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
        micro = [examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
        return [micro[i : i + self.grad_accum] for i in range(0, len(micro), self.grad_accum)]

    def example_seed(self, epoch: int, example: int) -> int:
        """The sampling seed of one example: independent of rank, world size and resumption."""
        return int(np.random.SeedSequence([self.seed, epoch, example]).generate_state(1, np.uint64)[0])


@dataclass
class Batch:
    """One micro-batch: padded inputs and the sparse targets at its completion positions."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    positions: Tensor  # [P] flat indices into B*T: where each completion token is predicted
    weights: Tensor  # [P]
    targets: SparseTargets
    num_tokens: int

    def inputs(self, device: torch.device) -> tuple[Tensor, ...]:
        """The arguments of ``CompletionLoss.forward``, on ``device``."""
        targets = self.targets.to(device)
        return (
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.positions.to(device),
            self.weights.to(device),
            targets.offsets,
            targets.tokens,
            targets.probs,
        )


class ExampleBuilder:
    """Turns example indices into batches: samples a completion path from the prompt's trie and
    reads its next-token targets (soft) or its tokens (hard)."""

    def __init__(self, config: TrainConfig, prompt_ids: list[list[int]], tries: list[Any], pad_id: int):
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
        positions = []
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


# ----------------------------------------------------------------------------- model


class CompletionLoss(nn.Module):
    """The trained module: the LoRA-wrapped LM plus the fused loss over completion positions.

    The loss lives inside ``forward`` so that DDP synchronizes its gradients and FSDP has the
    LM head gathered when the loss reads it. Logits are never formed for prompt positions.
    """

    def __init__(self, lm: nn.Module, temperature: float, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_size = chunk_size or None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
        weights: Tensor,
        offsets: Tensor,
        tokens: Tensor,
        probs: Tensor,
    ) -> Tensor:
        causal_lm = self.lm.get_base_model()
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = causal_lm.get_output_embeddings()
        return fused_sparse_kl(
            hidden,
            head.weight,
            SparseTargets(offsets, tokens, probs),
            weights,
            bias=head.bias,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )


def trainable_module(model: nn.Module, config: TrainConfig) -> CompletionLoss:
    """The LoRA-wrapped model with its loss, in training mode (hard targets: plain τ = 1)."""
    model.config.use_cache = False
    temperature = config.temperature if config.method == "soft" else 1.0
    return CompletionLoss(add_lora(model, config), temperature, config.chunk_size).train()


def check_model(model: nn.Module, config: TrainConfig) -> None:
    """Reject models the fused loss or the LoRA targets do not fit, before training starts."""
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None):
        raise ValueError(
            f"model {config.model!r} rescales its logits (soft-capping / logit scale), which the fused loss does not model"
        )
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in config.lora_targets if target not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora_targets: {', '.join(missing)} not found in model {config.model!r}; its linear modules are {', '.join(linear)}"
        )


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from calibft.models import peft_wrapping

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    with peft_wrapping():
        peft_model = get_peft_model(model, lora)
    # Record the name the user gave (e.g. the alias), which calibft.models resolves again.
    peft_model.peft_config["default"].base_model_name_or_path = config.model
    return peft_model


def check_prompt_prefix(tokenizer: Any, chat: Any, prompt: str, prompt_ids: list[int], path: np.ndarray) -> None:
    """The templated prompt's ids must be a prefix of the ids of prompt + completion: otherwise
    the model would be trained on token boundaries it never sees when generating."""
    value = tokenizer.decode(path[:-1].tolist())
    full = list(tokenizer(chat.render(prompt) + value, add_special_tokens=False)["input_ids"])
    if full != prompt_ids + path[:-1].tolist():
        raise ValueError(
            f"tokenizing the chat-templated prompt followed by {value!r} does not give the prompt's ids "
            "followed by the completion's: the chat template's end merges with the answer"
        )


# ----------------------------------------------------------------------------- checkpoints


def _checkpoints(output: Path) -> list[Path]:
    root = output / CHECKPOINT_DIR
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _trainable_only(model: nn.Module, weights: list[dict[str, Tensor]]) -> None:
    """Keep checkpoints small: only the trainable (LoRA) tensors, not the frozen base model."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for state in weights:
        for key in [k for k in state if k not in trainable]:
            del state[key]


def save_checkpoint(accelerator: Any, output: Path, step: int, config: TrainConfig) -> None:
    """Save everything needed to resume, atomically: written to a temporary directory, renamed."""
    root = output / CHECKPOINT_DIR
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(output)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, output: Path) -> int:
    """Restore the latest checkpoint under ``output``; returns its step (0 when there is none)."""
    found = _checkpoints(output)
    if not found:
        logger.warning("--resume: no checkpoint under %s; starting from scratch", output)
        return 0
    accelerator.load_state(str(found[-1]), strict=False)
    step = int(json.loads((found[-1] / STATE_FILE).read_text())["step"])
    logger.info("resumed from %s (step %d)", found[-1], step)
    return step


class MetricsLog:
    """metrics.jsonl on the main process, trimmed to the resumed step on --resume."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- training


def _prepare_targets(config: TrainConfig, tokenizer: Any, prompts: list[PromptSpec], is_main: bool):
    from calibft.chat import ChatFormat
    from calibft.targets import TrieTokenizer, build_spaces_and_tries

    chat = ChatFormat.from_tokenizer(tokenizer)
    _, tries = build_spaces_and_tries(
        prompts,
        TrieTokenizer.from_hf(tokenizer, chat),
        decimals=config.decimals,
        max_bins=config.max_bins,
        keep_spaces=False,
        progress=is_main,
    )
    prompt_ids = [chat.prompt_ids(spec.prompt) for spec in prompts]
    longest = max(len(ids) + int(trie.depths().max()) - 1 for ids, trie in zip(prompt_ids, tries))
    if longest > config.max_seq_len:
        raise ValueError(f"max_seq_len: prompt + completion reach {longest} tokens, above max_seq_len={config.max_seq_len}")
    _, offsets, ids = tries[0].sample_paths(1, config.seed)
    check_prompt_prefix(tokenizer, chat, prompts[0].prompt, prompt_ids[0], ids[offsets[0] : offsets[1]])
    return prompt_ids, tries


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train an adapter per ``config``; returns the output directory.

    The output directory receives the PEFT adapter (adapter_config.json,
    adapter_model.safetensors), train_config.json, metrics.jsonl and checkpoints/.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from calibft.models import load_model_and_tokenizer, load_skeleton

    config.validate()
    # A missing model or LoRA target fails here, before weights or targets are built.
    check_model(load_skeleton(config.model), config)
    output = Path(config.output)
    prompts = select_prompts(config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=config.report_to or None,
        project_dir=str(output),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on a machine without GPUs: every rank would train alone on all the data
        # and all of them would write the same output directory.
        raise ValueError(
            f"launched as {launched} processes but accelerate runs {accelerator.num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1"
        )
    if not resume and _checkpoints(output):
        raise ValueError(f"output {str(output)!r} already holds checkpoints; pass --resume or choose another --output")
    set_seed(config.seed)

    model, tokenizer = load_model_and_tokenizer(config.model)
    prompt_ids, tries = _prepare_targets(config, tokenizer, prompts, accelerator.is_main_process)
    module = trainable_module(model, config)

    plan = DataPlan.for_run(config, prompts, accelerator.process_index, accelerator.num_processes)
    total_steps = plan.steps_per_epoch * config.epochs
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # Not passed to prepare(): accelerate would step it once per process, but our step counts
    # are already per rank.
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(lambda models, weights, _dir: _trainable_only(models[0], weights))

    start_step = load_checkpoint(accelerator, output) if resume else 0
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / CONFIG_FILE, json.dumps(config.to_dict(), indent=1) + "\n")
    metrics = MetricsLog(output / METRICS_FILE, start_step, accelerator.is_main_process)
    if config.report_to:
        accelerator.init_trackers("calibft", config=config.to_dict())
    builder = ExampleBuilder(config, prompt_ids, tries, tokenizer.pad_token_id or 0)
    logger.info(
        "%s training: %d prompts x %d samples, %d epochs, %d steps on %d process(es)",
        config.method, len(prompts), config.repeats, config.epochs, total_steps, accelerator.num_processes,
    )

    bar = tqdm(total=total_steps, initial=start_step, desc=f"train ({config.method})", disable=not accelerator.is_main_process)
    step = start_step
    for epoch in range(start_step // plan.steps_per_epoch, config.epochs):
        epoch_steps = plan.steps(epoch)
        logger.debug("epoch %d rank %d examples %s", epoch, plan.rank, plan.local_examples(epoch))
        for micro_batches in epoch_steps[step - epoch * plan.steps_per_epoch :]:
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = 0
            for i, examples in enumerate(micro_batches):
                batch = builder.batch(plan, epoch, examples)
                tokens += batch.num_tokens
                # Gradients are synchronized across ranks on the last micro-batch only.
                sync = i == len(micro_batches) - 1
                with accelerator.no_sync(module) if not sync else contextlib.nullcontext():
                    loss = _forward(module, batch, accelerator.device) / len(micro_batches)
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": accelerator.reduce(loss_sum, "mean").item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens * accelerator.num_processes / elapsed,
                }
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if config.report_to:
                    accelerator.log(record, step=step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(accelerator, output, step, config)
    bar.close()
    save_adapter(accelerator, module, output)
    if config.report_to:
        accelerator.end_training()
    if config.eval_per_family and accelerator.is_main_process:
        del module, optimizer, model
        compare_with_base(config, output)
    accelerator.wait_for_everyone()
    return output


def compare_with_base(config: TrainConfig, output: Path) -> dict[str, Any]:
    """Evaluate base model and the new adapter on a few held-out OOD prompts and print the
    before/after table; the full report lands in ``output/eval``."""
    from calibft.evaluate import EvalConfig, evaluate

    report = evaluate(
        EvalConfig(
            model=config.model,
            adapters=[str(output)],
            split="ood",
            per_family=config.eval_per_family,
            samples=config.eval_samples,
            seed=config.seed,
            exact=False,
            output=str(output / "eval"),
        )
    )
    print(format_comparison(report))
    return report


def format_comparison(report: dict[str, Any]) -> str:
    """A per-family before/after table of valid rate and normalized W1, plus the aggregate."""
    rows = {}
    for record in report["prompts"]:
        key = (record["family"], json.dumps(record["params"]))
        rows.setdefault(key, {})[record["checkpoint"]] = record
    names = list(report["checkpoints"])
    header = f"{'held-out prompt':<44}" + "".join(f"{name[:14] + ' valid':>22}{'W1':>10}" for name in names)
    lines = [header, "-" * len(header)]
    for (family, params), by_name in rows.items():
        shown = ",".join(f"{k}={v:g}" for k, v in json.loads(params).items())
        line = f"{family + ' ' + shown:<44.44}"
        for name in names:
            record = by_name.get(name, {})
            line += f"{format_value(record.get('valid_rate')):>22}{format_value(record.get('normalized_w1')):>10}"
        lines.append(line)
    lines.append("-" * len(header))
    summary = f"{'all: mean valid, median W1':<44}"
    for name in names:
        split = report["checkpoints"][name]["splits"]["test_ood_family"]
        summary += f"{format_value(split['valid_rate']):>22}{format_value(split['median_normalized_w1']):>10}"
    lines.append(summary)
    lines.append("(valid: share of generations that parse as a number in the support; W1: Q95-Q05-normalized)")
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """A metric for the comparison table: 3 significant digits, or n/a when undefined."""
    return "n/a" if value is None else f"{value:.3g}"


def _forward(module: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    return module(*batch.inputs(device))


def save_adapter(accelerator: Any, module: nn.Module, output: Path) -> None:
    """Write the PEFT adapter into ``output``, each file replaced atomically."""
    state = accelerator.get_state_dict(module)  # gathers FSDP shards; every rank must call it
    if accelerator.is_main_process:
        lm = accelerator.unwrap_model(module).lm
        prefix = "lm."
        lm_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        staging = output / ".adapter-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        lm.save_pretrained(str(staging), state_dict=lm_state, save_embedding_layers=False)
        for path in staging.iterdir():
            os.replace(path, output / path.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def build_parser() -> argparse.ArgumentParser:
    from calibft.config import TrainConfig, field_help

    defaults = TrainConfig().to_dict()
    keys = "\n".join(f"  {name:<18} {text} (default {defaults[name]!r})" for name, text in field_help().items())
    parser = argparse.ArgumentParser(
        prog="calibft train",
        description="Calibration fine-tuning of a causal LM with LoRA (soft or hard targets).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="KEY=VALUE overrides set any config field (e.g. epochs=1 lr=1e-4 families=gaussian,beta).\n"
        "Precedence: preset < --config file < flags < KEY=VALUE.\n\nconfig keys:\n" + keys,
    )
    parser.add_argument("--config", help="TOML / YAML / JSON file of config fields")
    parser.add_argument("--preset", help="quick | paper-soft | paper-hard (default: paper-<method>)")
    parser.add_argument("--method", help="soft | hard")
    parser.add_argument("--model", help="HF id, local dir, .gguf file or smollm2-135m (default)")
    parser.add_argument("--output", help="output directory (default runs/train)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--seed", help="random seed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config field overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``calibft train``: parse arguments, resolve the configuration, train. Raises ValueError
    for user mistakes (the CLI prints them as one line)."""
    from calibft.config import load_config

    args = build_parser().parse_args(argv)
    flags = {"method": args.method, "model": args.model, "output": args.output, "seed": args.seed}
    config = load_config(
        preset=args.preset,
        config_file=args.config,
        cli={key: value for key, value in flags.items() if value is not None},
        overrides=args.overrides,
    )
    output = train(config, resume=args.resume)
    print(f"adapter saved to {output}")
    return 0


if __name__ == "__main__":  # `accelerate launch -m calibft.train ...`
    import sys

    from calibft.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
