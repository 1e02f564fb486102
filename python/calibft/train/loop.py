"""Calibration fine-tuning: LoRA on a frozen causal LM with soft (trie KL) or hard (CE) targets.

One loop, readable top to bottom (``train``). It runs unchanged on one CPU or under
``accelerate launch`` (DDP or FSDP): every rank plans the same family-balanced order per epoch
and takes every world_size-th example of it (docs/method.md §7).

Examples are drawn deterministically from (seed, epoch, example index), so a run resumed from a
checkpoint (adapter, optimizer, scheduler, RNG states, step) ends with the same adapter as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from calibft.config import validate
from calibft.eval import categorical, structured
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate
from calibft.files import atomic_write_text
from calibft.lm.adapters import CONFIG_FILE, LORA_MODULES, add_lora
from calibft.lm.decode import logit_head
from calibft.lm.load import load_model_and_tokenizer, load_skeleton
from calibft.losses import SparseTargets, fused_sparse_kl
from calibft.train.checkpoints import (
    METRICS_FILE,
    MetricsLog,
    load_checkpoint,
    save_checkpoint,
    saved_checkpoints,
    trainable_only,
)
from calibft.train.config import TrainConfig
from calibft.train.data import (
    Batch,
    DataPlan,
    ExampleBuilder,
    check_categorical,
    prepare_targets,
    select_targets,
)
from calibft.train.model_card import write_model_card

logger = logging.getLogger("calibft.train")


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
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = logit_head(causal_lm)
        return fused_sparse_kl(
            hidden,
            head.weight,
            SparseTargets(offsets, tokens, probs),
            weights,
            bias=head.bias,
            softcap=head.softcap,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )


def trainable_module(model: nn.Module, config: TrainConfig) -> CompletionLoss:
    """The LoRA-wrapped model with its loss, in training mode (hard targets: plain τ = 1)."""
    model.config.use_cache = False
    temperature = config.temperature if config.method == "soft" else 1.0
    lm = add_lora(
        model,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        targets=config.lora_targets,
        base_name=config.model,
    )
    return CompletionLoss(lm, temperature, config.chunk_size).train()


def check_model(model: nn.Module, config: TrainConfig) -> None:
    """Reject models the fused loss or the LoRA targets do not fit, before training starts."""
    logit_head(model)  # soft-capped heads are modelled; a logit scale is refused here
    # Only these module types take a LoRA adapter (GPT-OSS's experts, 3D parameters, do not).
    adaptable = (name for name, m in model.named_modules() if isinstance(m, LORA_MODULES))
    names = {name.rsplit(".", 1)[-1] for name in adaptable}
    missing = [target for target in config.lora_targets if target not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"lora_targets: {', '.join(missing)} not found in model {config.model!r}; its linear modules are {', '.join(linear)}"
        )


# ----------------------------------------------------------------------------- training


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train an adapter per ``config``; returns the output directory.

    The output directory receives the PEFT adapter (adapter_config.json,
    adapter_model.safetensors), train_config.json, metrics.jsonl and checkpoints/.
    """
    validate(config)
    # A missing model or LoRA target fails here, before weights or targets are built.
    check_model(load_skeleton(config.model), config)
    output = Path(config.output)
    prompts = select_targets(config)
    check_categorical(config, prompts)
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
    if not resume and saved_checkpoints(output):
        raise ValueError(
            f"output {str(output)!r} already holds checkpoints; pass --resume or choose another --output"
        )
    set_seed(config.seed)

    model, tokenizer = load_model_and_tokenizer(config.model)
    prompt_ids, tries = prepare_targets(config, tokenizer, prompts, accelerator.is_main_process)
    module = trainable_module(model, config)

    plan = DataPlan.for_run(config, prompts, accelerator.process_index, accelerator.num_processes)
    total_steps = plan.steps_per_epoch * config.epochs
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # Not passed to prepare(): accelerate would step it once per process, but our step counts
    # are already per rank.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps
    )
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(
        lambda models, weights, _dir: trainable_only(models[0], weights)
    )

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
        config.method,
        len(prompts),
        config.repeats,
        config.epochs,
        total_steps,
        accelerator.num_processes,
    )

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train ({config.method})",
        disable=not accelerator.is_main_process,
    )
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
            if (
                config.checkpoint_every
                and step % config.checkpoint_every == 0
                and step < total_steps
            ):
                save_checkpoint(accelerator, output, step, config.keep_checkpoints)
    bar.close()
    save_adapter(accelerator, module, output)
    if config.report_to:
        accelerator.end_training()
    report = None
    if (config.eval_per_family or config.eval_categorical) and accelerator.is_main_process:
        del module, optimizer, model
        report = compare_with_base(config, output)
    if accelerator.is_main_process:
        write_model_card(output, config, report)
    accelerator.wait_for_everyone()
    return output


def compare_with_base(config: TrainConfig, output: Path) -> dict[str, Any]:
    """Evaluate base model and the new adapter on a few held-out prompts and print the
    before/after tables: structured sampling on OOD families (``eval_per_family``), the exact
    categorical figures on held-out target sets (``eval_categorical``, no sampling). The full
    report lands in ``output/eval``."""
    shared = EvalConfig(
        model=config.model, adapters=[str(output)], seed=config.seed, output=str(output / "eval")
    )
    benchmarks: dict[str, Any] = {}
    if config.eval_per_family:
        benchmarks[structured.NAME] = structured.Config(
            split="ood", per_family=config.eval_per_family, samples=config.eval_samples, exact=False
        )
    if config.eval_categorical:
        benchmarks[categorical.NAME] = categorical.Config(
            targets=config.eval_targets, per_group=config.eval_categorical, samples=0
        )
    report = evaluate(shared, benchmarks)
    for module in (structured, categorical):
        if module.NAME in benchmarks:
            print(module.comparison_table(report))
    return report


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
