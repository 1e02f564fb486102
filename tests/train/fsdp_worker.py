"""One training step under FSDP2, FSDP1 and DDP on a gloo CPU mesh, run by
tests/train/test_distributed.py under torchrun. accelerate enables FSDP on GPUs only, so its own
FSDP2 preparation (`fsdp2_prepare_model`) is called here with the plugin `configure_fsdp` set
up, and FSDP1 wraps the module with that plugin's policy as accelerate's `prepare` does; the
accelerator is then told it runs FSDP1, so that its `clip_grad_norm_` takes the FSDP branch.

Usage: fsdp_worker.py MODEL_DIR RESULT_JSON. Rank 0 writes, per strategy, the step's loss
and gradient norm (fp32 parameters) and the adapter's tensors as gathered for a checkpoint; what
the FSDP2 units hold; and the dtypes the loss received under bf16 FSDP2 mixed precision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from transformers import get_constant_schedule

import calibft.train.loop as loop
from calibft.lm.load import load_model_and_tokenizer
from calibft.train.checkpoints import adapter_state, load_checkpoint, save_checkpoint
from calibft.train.data import DataPlan, ExampleBuilder, prepare_targets, select_prompts
from calibft.train.loop import configure_fsdp, train_step, trainable_module

CONFIG = dict(
    families=["gaussian", "uniform"],
    prompts_per_family=2,
    decimals=1,
    max_bins=32,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    max_seq_len=128,
    batch_size=2,
)


def step_inputs(config, rank: int, world_size: int):
    """The module (fresh LoRA, seed 0) and this rank's micro-batches of the run's first step."""
    model, tokenizer = load_model_and_tokenizer(config.model)
    prompts = select_prompts(config)
    prompt_ids, tries = prepare_targets(config, tokenizer, prompts, False)
    plan = DataPlan.for_run(config, prompts, rank, world_size)
    builder = ExampleBuilder(config, prompt_ids, tries, tokenizer.pad_token_id)
    torch.manual_seed(0)
    module = trainable_module(model, config)
    return module, [builder.batch(plan, 0, examples) for examples in plan.steps(0)[0]]


def sharded(config, module, mp_policy=None):
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    configure_fsdp(plugin, module)
    if mp_policy is not None:
        plugin.mixed_precision_policy = mp_policy
    shim = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no" if mp_policy is None else "bf16",
        is_main_process=torch.distributed.get_rank() == 0,
        device=torch.device("cpu"),
        parallelism_config=None,
    )
    return fsdp2_prepare_model(shim, module)


def one_step(accelerator, module, batches, checkpoint: Path, fresh):
    """The step's figures and adapter; then a checkpoint of it, loaded into `fresh()` (the same
    module before the step, wrapped alike), whose adapter is returned too."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_constant_schedule(optimizer)
    loss, _, grad_norm = train_step(accelerator, module, optimizer, scheduler, batches, 1e-3)
    loss = accelerator.reduce(loss, "mean")
    state = adapter_state(module)  # collective: every rank calls it
    schedule = {"world_size": 2, "batch_size": 2, "grad_accum": 1, "steps": "s"}
    save_checkpoint(accelerator, module, optimizer, scheduler, checkpoint, 1, 1, schedule)
    module = fresh()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_constant_schedule(optimizer)
    step = load_checkpoint(accelerator, module, optimizer, scheduler, checkpoint, schedule)
    loaded = adapter_state(module)
    return {
        "loss": float(loss),
        "grad_norm": float(grad_norm),
        "adapter": {k: v.tolist() for k, v in state.items()},
        "resumed_step": step,
        "resumed_adapter": {k: v.tolist() for k, v in loaded.items()},
    }


def main(model_dir: str, result: str) -> None:
    from calibft.config import build
    from calibft.train.config import TrainConfig

    accelerator = Accelerator()  # gloo on CPU
    rank, world = accelerator.process_index, accelerator.num_processes
    config = build(TrainConfig, {**CONFIG, "model": model_dir, "output": "unused"})

    module, batches = step_inputs(config, rank, world)
    module = sharded(config, module)
    units = [name for name, m in module.named_modules() if isinstance(m, FSDPModule)]
    fsdp2 = one_step(
        accelerator,
        module,
        batches,
        Path(result).with_name("fsdp2-out"),
        lambda: sharded(config, step_inputs(config, rank, world)[0]),
    )
    head = module.lm.get_base_model().get_output_embeddings().weight
    embed = module.lm.get_base_model().get_input_embeddings().weight

    # bf16 FSDP mixed precision casts floating forward inputs: the targets must still reach the
    # loss as float32, equal to the batch's.
    seen = []
    real = loop.fused_sparse_kl

    def spy(hidden, weight, targets, position_weights, **kwargs):
        seen.append(
            (str(targets.probs.dtype), str(position_weights.dtype), str(hidden.dtype), targets)
        )
        return real(hidden, weight, targets, position_weights, **kwargs)

    loop.fused_sparse_kl = spy
    mixed, batches = step_inputs(config, rank, world)
    mixed = sharded(config, mixed, MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    mixed(*batches[0].inputs(torch.device("cpu")))
    loop.fused_sparse_kl = real
    exact = bool(torch.equal(seen[0][3].probs, batches[0].targets.probs.float()))

    def fsdp1_module():
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1, auto_wrap_policy="transformer_based_wrap", use_orig_params=True
        )
        module, batches = step_inputs(config, rank, world)
        configure_fsdp(plugin, module)
        module = FSDP1(
            module,
            auto_wrap_policy=plugin.auto_wrap_policy,
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        accelerator._models[:] = [module]
        return module, batches

    module, batches = fsdp1_module()
    fsdp1 = one_step(
        accelerator,
        module,
        batches,
        Path(result).with_name("fsdp1-out"),
        lambda: fsdp1_module()[0],
    )

    def ddp_module():
        accelerator.state.distributed_type = DistributedType.MULTI_CPU
        module, batches = step_inputs(config, rank, world)
        module = torch.nn.parallel.DistributedDataParallel(module)
        accelerator._models[:] = [module]
        return module, batches

    module, batches = ddp_module()
    ddp = one_step(
        accelerator, module, batches, Path(result).with_name("ddp-out"), lambda: ddp_module()[0]
    )

    if rank == 0:
        record = {
            "fsdp2": fsdp2,
            "fsdp1": fsdp1,
            "ddp": ddp,
            "units": units,
            "tied": head is embed,
            "mixed_dtypes": list(seen[0][:3]),
            "mixed_targets_exact": exact,
        }
        with open(result, "w") as fh:
            json.dump(record, fh)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
