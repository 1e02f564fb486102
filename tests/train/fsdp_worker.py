"""One training step under FSDP2 on a gloo CPU mesh, run by tests/train/test_distributed.py under
torchrun (accelerate enables FSDP on GPUs only, so its own FSDP2 preparation,
`fsdp2_prepare_model`, is called here with the plugin `configure_fsdp` set up).

Usage: fsdp_worker.py MODEL_DIR RESULT_JSON. Rank 0 writes the step's loss and gradient norm
(fp32 parameters), what the FSDP units hold, the adapter's tensors as gathered for a checkpoint,
and the dtype the loss received its targets in under bf16 FSDP mixed precision.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from transformers import get_constant_schedule

import calibft.train.loop as loop
from calibft.lm.load import load_model_and_tokenizer
from calibft.train.checkpoints import adapter_state
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


def main(model_dir: str, result: str) -> None:
    from calibft.config import build
    from calibft.train.config import TrainConfig

    accelerator = Accelerator()  # gloo on CPU
    rank, world = accelerator.process_index, accelerator.num_processes
    config = build(TrainConfig, {**CONFIG, "model": model_dir, "output": "unused"})

    module, batches = step_inputs(config, rank, world)
    module = sharded(config, module)
    units = [name for name, m in module.named_modules() if isinstance(m, FSDPModule)]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_constant_schedule(optimizer)
    loss, grad_norm = train_step(accelerator, module, optimizer, scheduler, batches, 1e-3)
    loss = accelerator.reduce(loss, "mean")
    state = adapter_state(module)  # collective: every rank calls it
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

    if rank == 0:
        record = {
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "units": units,
            "tied": head is embed,
            "adapter": {k: v.tolist() for k, v in state.items()},
            "mixed_dtypes": list(seen[0][:3]),
            "mixed_targets_exact": exact,
        }
        with open(result, "w") as fh:
            json.dump(record, fh)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
