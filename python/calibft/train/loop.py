"""Calibration fine-tuning: LoRA on a frozen causal LM with soft (trie KL) or hard (CE) targets.

One loop, readable top to bottom (``train``). It runs unchanged on one CPU or GPU or under
``accelerate launch`` (DDP, FSDP1 or FSDP2): every rank plans the same family-balanced order per
epoch and takes every world_size-th example of it (docs/method.md §7).

Examples are drawn deterministically from (seed, epoch, example index) and dropout is reseeded
from (seed, rank, step) every step, so a run resumed from a checkpoint (adapter, optimizer,
scheduler, step) ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from calibft.config import validate
from calibft.eval import load_benchmark
from calibft.eval.report import headline_table
from calibft.eval.runner import evaluate
from calibft.files import atomic_write_text
from calibft.lm.adapters import CONFIG_FILE, add_lora, lora_target_names
from calibft.lm.decode import logit_head
from calibft.lm.load import load_model_and_tokenizer, load_skeleton
from calibft.losses import SparseTargets, fused_sparse_kl
from calibft.train.checkpoints import (
    METRICS_FILE,
    MetricsLog,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
    saved_checkpoints,
)
from calibft.train.config import TrainConfig, after_training_configs
from calibft.train.data import (
    Batch,
    DataPlan,
    ExampleBuilder,
    bits_float,
    check_categorical,
    prepare_targets,
    select_targets,
)
from calibft.train.model_card import write_model_card
from calibft.train.retention import (
    CURVES_FILE,
    RetentionProbe,
    load_or_build_replay,
    plot_curves,
    replay_indices,
    with_replay,
)

logger = logging.getLogger("calibft.train")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FSDP_POLICY_FLAG = "--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP"


# ----------------------------------------------------------------------------- model


class CompletionLoss(nn.Module):
    """The trained module: the LoRA-wrapped LM plus the fused loss over completion positions.

    The loss lives inside ``forward`` so that DDP synchronizes its gradients, and FSDP has the
    LM head unsharded when the loss reads it: the head (and the embeddings it may be tied to)
    stays in this root unit, `configure_fsdp` wraps the decoder layers only. Logits are never
    formed for prompt positions. The arguments are those of `calibft.train.data.Batch.inputs`;
    with ``replay`` (`calibft.train.retention.ReplayBatch.inputs`) the replay rows take a
    second decoder pass and the result is the pair (calibration loss, retention KL), the KL at
    τ = 1 (docs/method.md §9).
    """

    def __init__(self, lm: Any, temperature: float, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_size = chunk_size or None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
        offsets: Sequence[int],
        tokens: Tensor,
        prob_bits: Tensor,
        weight_bits: Tensor,
        replay: tuple[Any, ...] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        causal_lm = self.lm.get_base_model()
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = logit_head(causal_lm)
        targets = SparseTargets(torch.as_tensor(offsets), tokens, bits_float(prob_bits))
        loss = fused_sparse_kl(
            hidden,
            head.weight,
            targets,
            bits_float(weight_bits),
            bias=head.bias,
            softcap=head.softcap,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )
        if replay is None:
            return loss
        # Bit patterns of the float32 probabilities, rest masses and weights, as for the batch.
        r_ids, r_mask, r_at, r_offsets, r_tokens, r_probs, r_rest, r_weights = replay
        r_hidden = causal_lm.get_decoder()(
            input_ids=r_ids, attention_mask=r_mask, use_cache=False
        ).last_hidden_state
        r_targets = SparseTargets(
            torch.as_tensor(r_offsets), r_tokens, bits_float(r_probs), bits_float(r_rest)
        )
        retention = fused_sparse_kl(
            r_hidden.reshape(-1, r_hidden.shape[-1]).index_select(0, r_at),
            head.weight,
            r_targets,
            bits_float(r_weights),
            bias=head.bias,
            softcap=head.softcap,
            chunk_size=self.chunk_size,
        )
        return loss, retention


def trainable_module(model: Any, config: TrainConfig) -> CompletionLoss:
    """The LoRA-wrapped model with its loss, in training mode (hard targets: plain τ = 1)."""
    if config.gradient_checkpointing:
        # Non-reentrant: the reentrant variant gives no gradient to LoRA weights when the
        # checkpointed layer's inputs (frozen embeddings) do not require grad.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
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
    # Only these module types take a LoRA adapter (GPT-OSS's experts, 3D parameters, do not), and
    # only in the language model does one get a gradient from text.
    inside, outside = lora_target_names(model, config.lora_targets)
    found = {name.rsplit(".", 1)[-1] for name in inside}
    missing = [target for target in config.lora_targets if target not in found]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        elsewhere = sorted({n for n in outside if n.rsplit(".", 1)[-1] in missing})
        where = (
            f"only outside the language model, where text gives no gradient ({elsewhere[0]}, ...)"
            if elsewhere
            else "not found"
        )
        raise ValueError(
            f"lora_targets: {', '.join(missing)} {where} in model {config.model!r}; its linear "
            f"modules are {', '.join(linear)}"
        )


def check_gradients(module: nn.Module) -> None:
    """After a step's backward: refuse trainable parameters that received no gradient (under DDP
    they would stall the gradient reducer), naming them."""
    idle = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    if idle:
        raise ValueError(
            f"{len(idle)} trainable parameters get no gradient from the training loss "
            f"({', '.join(idle[:3])}{', ...' if len(idle) > 3 else ''}); drop their modules "
            "from lora_targets"
        )


def configure_fsdp(plugin: Any, module: CompletionLoss) -> None:
    """Before ``prepare``: make accelerate's FSDP plugin shard one decoder layer per unit.

    Without a wrap policy FSDP builds one unit, gathering the whole model on every GPU (and,
    in FSDP1, keeping gradients for all of it); size-based wrapping splits off the LM head and
    the embeddings it may be tied to. Both are refused. FSDP1 also wraps every LoRA leaf apart
    (peft's policy): frozen base and float32 LoRA weights then never share a flat parameter.
    Gradients are reduced in float32 under mixed precision.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        raise ValueError(
            "FSDP without per-layer wrapping gathers the whole model on every GPU (or splits off "
            f"the LM head); launch with {FSDP_POLICY_FLAG}"
        )
    mixed = plugin.mixed_precision_policy
    if mixed is not None and mixed.reduce_dtype not in (None, torch.float32):
        # LoRA gradients are a few MB: averaged across ranks in float32, not rounded to bf16.
        plugin.mixed_precision_policy = dataclasses.replace(mixed, reduce_dtype=torch.float32)
    layers = module.lm.get_base_model().get_decoder().layers
    plugin.transformer_cls_names_to_wrap = sorted({type(layer).__name__ for layer in layers})
    if plugin.fsdp_version == 1:
        from peft.utils.other import fsdp_auto_wrap_policy

        if not plugin.use_orig_params:
            raise ValueError("FSDP1 trains LoRA only with --fsdp_use_orig_params true")
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(module.lm)


# ----------------------------------------------------------------------------- training


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: dropout masks differ across ranks and steps, and are
    the same when a run is resumed."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def train_step(
    accelerator: Any,
    module: nn.Module,
    optimizer: Any,
    scheduler: Any,
    micro_batches: Sequence[Batch],
    max_grad_norm: float,
    *,
    check: bool = False,
    retention_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer step over `micro_batches` (this rank's share); returns this rank's loss,
    its retention KL (0 without replay rows, `calibft.train.retention.ReplayBatch`) and the norm
    of all trainable gradients before clipping (equal on every rank). The step's objective is
    the mean calibration loss + `retention_weight` × the retention KL. With `check`, a
    parameter without gradient is refused (`check_gradients`) before the optimizer steps."""
    loss_sum = torch.zeros((), device=accelerator.device)
    retention_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        # Gradients are synchronized across ranks on the last micro-batch only.
        sync = i == len(micro_batches) - 1
        with accelerator.no_sync(module) if not sync else contextlib.nullcontext():
            out = _forward(module, batch, accelerator.device)
            if isinstance(out, tuple):  # replay rows: their KL is the step's, not divided
                loss, retention = out[0] / len(micro_batches), out[1]
                accelerator.backward(loss + retention_weight * retention)
                retention_sum += retention.detach()
            else:
                loss = out / len(micro_batches)
                accelerator.backward(loss)
        loss_sum += loss.detach()
    if check:
        check_gradients(accelerator.unwrap_model(module))
    # All of the prepared module's parameters (frozen ones have no gradient): accelerate then
    # takes FSDP's sharded norm, and under FSDP2 the parameters `prepare` swapped in.
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, retention_sum, grad_norm


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train an adapter per ``config``; returns the output directory.

    The output directory receives the PEFT adapter (adapter_config.json,
    adapter_model.safetensors), train_config.json, metrics.jsonl and checkpoints/.
    """
    validate(config)
    output = Path(config.output)
    # What accelerate will pick (ACCELERATE_USE_CPU: the CPU whatever GPUs there are).
    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    accelerator = Accelerator(
        mixed_precision=config.resolved_mixed_precision(cuda),
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
    # A missing model or LoRA target fails here, before weights or targets are built; a GGUF
    # model is converted once per machine, by its first process.
    with accelerator.local_main_process_first():
        check_model(load_skeleton(config.model), config)
    prompts = select_targets(config)
    check_categorical(config, prompts)
    has_checkpoints = broadcast_object_list([bool(saved_checkpoints(output))])[0]
    if not resume and has_checkpoints:
        raise ValueError(
            f"output {str(output)!r} already holds checkpoints; pass --resume or choose another "
            "--output"
        )
    if cuda:
        # The float32 products left (mixed_precision=no, or the LoRA branch) run on tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed)  # the LoRA init: the same on every rank

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    model, tokenizer = load_model_and_tokenizer(
        config.model,
        dtype=TORCH_DTYPES[config.resolved_dtype(cuda)],
        # Straight onto this rank's device; under FSDP `prepare` places the shards.
        device=None if fsdp else accelerator.device,
    )
    prompt_ids, tries = prepare_targets(config, tokenizer, prompts, accelerator.is_main_process)
    module = trainable_module(model, config)
    replay = None
    if config.retention_weight:
        # Before prepare, unsharded (under FSDP on the CPU); the main process writes the cache
        # that the others then read.
        with accelerator.main_process_first():
            replay = load_or_build_replay(
                config, module.lm, tokenizer, output, accelerator.is_main_process
            )
    probe = None
    if config.retention_eval_every:
        if fsdp:
            raise ValueError(
                "retention_eval_every: not under FSDP; run calibft eval retention on the adapter"
            )
        probe = RetentionProbe(tokenizer, config.max_seq_len)
    if fsdp:
        configure_fsdp(accelerator.state.fsdp_plugin, module)

    plan = DataPlan.for_run(config, prompts, accelerator.process_index, accelerator.num_processes)
    total_steps = plan.steps_per_epoch * config.epochs
    signature = plan.signature(config.epochs, config.token_mean)
    if config.retention_weight:  # replay draws depend on the replay examples per step, all ranks
        signature += f";replay {plan.world_size * config.retention_batch_size}"
    schedule = {
        "world_size": plan.world_size,
        "batch_size": plan.batch_size,
        "grad_accum": plan.grad_accum,
        "steps": signature,
    }
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    del trainable  # prepare may replace the parameters (FSDP2): the optimizer follows, not a list
    # Not passed to prepare(): accelerate would step it once per process, but our step counts
    # are already per rank.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps
    )
    module, optimizer = accelerator.prepare(module, optimizer)

    start_step = 0
    if resume:
        start_step = load_checkpoint(accelerator, module, optimizer, scheduler, output, schedule)
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
    if probe is not None and start_step == 0 and accelerator.is_main_process:
        metrics.write({"step": 0, **probe.measure(accelerator.unwrap_model(module).lm)})
    step = start_step
    for epoch in range(start_step // plan.steps_per_epoch, config.epochs):
        epoch_steps = plan.steps(epoch)
        logger.debug("epoch %d rank %d examples %s", epoch, plan.rank, plan.local_examples(epoch))
        for examples in epoch_steps[step - epoch * plan.steps_per_epoch :]:
            started = time.perf_counter()
            torch.manual_seed(dropout_seed(config.seed, plan.rank, step))
            micro_batches = [builder.batch(plan, epoch, ex) for ex in examples]
            if replay:
                chosen = replay_indices(
                    len(replay),
                    config.seed,
                    step,
                    plan.rank,
                    plan.world_size,
                    config.retention_batch_size,
                )
                micro_batches[-1] = with_replay(
                    micro_batches[-1], [replay[i] for i in chosen], builder.pad_id
                )
            lr = scheduler.get_last_lr()[0]
            loss_sum, retention_sum, grad_norm = train_step(
                accelerator,
                module,
                optimizer,
                scheduler,
                micro_batches,
                config.max_grad_norm,
                check=step == start_step and not fsdp,
                retention_weight=config.retention_weight,
            )
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                tokens = torch.tensor(
                    float(sum(b.num_tokens for b in micro_batches)), device=accelerator.device
                )
                tokens = accelerator.reduce(tokens, "sum").item()  # waits for the device too
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": accelerator.reduce(loss_sum, "mean").item(),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens / (time.perf_counter() - started),
                }
                if replay:
                    record["retention_kl"] = accelerator.reduce(retention_sum, "mean").item()
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if config.report_to:
                    accelerator.log(record, step=step)
            if probe is not None and (
                step % config.retention_eval_every == 0 or step == total_steps
            ):
                if accelerator.is_main_process:
                    figures = probe.measure(accelerator.unwrap_model(module).lm)
                    metrics.write({"step": step, "epoch": epoch, **figures})
            if (
                config.checkpoint_every
                and step % config.checkpoint_every == 0
                and step < total_steps
            ):
                save_checkpoint(
                    accelerator,
                    module,
                    optimizer,
                    scheduler,
                    output,
                    step,
                    config.keep_checkpoints,
                    schedule,
                )
    bar.close()
    save_adapter(accelerator, module, output)
    if config.report_to:
        accelerator.end_training()
    del module, optimizer, scheduler, model
    leave_training(accelerator)
    if not accelerator.is_main_process:
        return output
    plot_curves(output / METRICS_FILE, output / CURVES_FILE)
    report = None
    if config.eval:
        report = compare_with_base(config, output)
    write_model_card(output, config, report)
    return output


def leave_training(accelerator: Any) -> None:
    """Free the training model on every rank, then end the process group: the main process
    evaluates alone afterwards, and no other rank waits for it in a collective that would time
    out (NCCL's watchdog kills a job after 10 minutes in a barrier). The caller has dropped its
    own references to the module and optimizer."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def compare_with_base(config: TrainConfig, output: Path) -> dict[str, Any]:
    """Run the ``eval`` benchmarks (settings: ``eval_config``) on the base model and the new
    adapter and print the headline table; the full report lands in ``output/eval``."""
    shared, benchmarks = after_training_configs(config, str(output))
    report = evaluate(shared, benchmarks)
    print(headline_table(report, {name: load_benchmark(name) for name in benchmarks}))
    return report


def _forward(
    module: nn.Module, batch: Batch, device: torch.device
) -> Tensor | tuple[Tensor, Tensor]:
    return module(*batch.inputs(device))
