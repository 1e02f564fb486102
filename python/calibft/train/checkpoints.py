"""Resumable training state and the adapter files.

A checkpoint directory holds the adapter as peft writes it (adapter_config.json and
adapter_model.safetensors: the LoRA tensors only, under peft's names, whatever wrapped the model
in training), the optimizer and scheduler states (training_state.pt) and trainer_state.json (the
step and the data plan it belongs to). Tensors are gathered without the frozen base
(``ignore_frozen_params``), so under FSDP no rank ever holds the whole model to save a few MB.

Only the main process reads and writes these files; the other ranks receive their state from it
(``broadcast_from_rank0``), so a multi-node run needs its output directory on the main process'
machine only. Dropout is reseeded every step (`calibft.train.loop`), so no random-number state
is saved.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

from calibft.files import atomic_write_text

logger = logging.getLogger("calibft.train")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"

# Gathered in full to the main process' CPU, frozen base left out.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Segments that FSDP1 units and activation checkpointing add inside the unwrapped module.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def saved_checkpoints(output: Path) -> list[Path]:
    """The resumable checkpoints under `output`, oldest first."""
    root = output / CHECKPOINT_DIR
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def peft_name(name: str) -> str:
    """The name peft saves a parameter of the trained module under: without the module's 'lm.'
    and the adapter's name ('default')."""
    return re.sub(r"\.default(?=\.|$)", "", name.removeprefix("lm."))


def trainable_names(module: nn.Module) -> dict[str, str]:
    """peft name -> parameter name (without wrapper segments) of every trainable parameter of
    the trained module, prepared or not."""
    names = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            name = _unwrapped_name(name)
            names[peft_name(name)] = name
    return names


def _unwrapped_name(name: str) -> str:
    name = name.removeprefix("module.")  # DDP
    for segment in _WRAPPERS:
        name = name.replace(segment, "")
    return name


def adapter_state(module: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors of the (prepared) trained module by parameter name, gathered to the
    main process' CPU without the frozen base; every rank must call it, the others get {}."""
    if isinstance(module, FSDP1):
        return _fsdp1_adapter_state(module)
    state: dict[str, Any] = get_model_state_dict(module, options=_GATHER)
    # A frozen weight tied to another name (the LM head of tied embeddings) escapes
    # ignore_frozen_params under its second name.
    trainable = set(trainable_names(module).values())
    return {name: tensor for name, tensor in state.items() if name in trainable}


def _fsdp1_adapter_state(module: nn.Module) -> dict[str, Tensor]:
    """FSDP1: torch's state-dict functions gather the whole model there (FULL_STATE_DICT) and
    fail on tied frozen weights; the LoRA leaves are units of their own (`configure_fsdp`), so
    each is gathered alone."""
    main = torch.distributed.get_rank() == 0
    state = {}
    for prefix, unit in module.named_modules():
        params = list(unit.parameters())
        if not isinstance(unit, FSDP1) or not params or not all(p.requires_grad for p in params):
            continue
        with FSDP1.summon_full_params(
            unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=True
        ):
            for name, param in unit.named_parameters():
                if main:
                    state[_unwrapped_name(f"{prefix}.{name}")] = param.detach().clone()
    if main and set(state) != set(trainable_names(module).values()):
        raise ValueError("FSDP1: LoRA weights outside their own FSDP units; use FSDP2")
    return state


def write_adapter(lm: Any, state: dict[str, Tensor], directory: Path) -> None:
    """Write the PEFT adapter of `lm` (the peft model) with the tensors of `adapter_state` into
    `directory` as peft does (adapter_config.json in inference mode, adapter_model.safetensors
    under peft's names), each file replaced atomically. Written here, not by peft's
    ``save_pretrained``, which matches tensors to modules by name and finds none under FSDP1."""
    staging = directory / ".adapter-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = copy.copy(lm.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(staging))
    tensors = {peft_name(name): tensor.contiguous() for name, tensor in state.items()}
    save_file(tensors, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
    for path in staging.iterdir():
        os.replace(path, directory / path.name)
    staging.rmdir()


def save_adapter(accelerator: Any, module: nn.Module, output: Path) -> None:
    """Write the trained adapter into ``output`` (every rank must call it)."""
    state = adapter_state(module)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        write_adapter(accelerator.unwrap_model(module).lm, state, output)
    accelerator.wait_for_everyone()


def _unwrapped_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def save_checkpoint(
    accelerator: Any,
    module: nn.Module,
    optimizer: Any,
    scheduler: Any,
    output: Path,
    step: int,
    keep: int,
    schedule: dict[str, Any],
) -> None:
    """Save everything needed to resume at `step`, atomically (written to a temporary directory,
    then renamed); `schedule` describes the data plan (see `load_checkpoint`)."""
    adapter = adapter_state(module)
    optim = get_optimizer_state_dict(
        module,
        _unwrapped_optimizer(optimizer),
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if accelerator.is_main_process:
        root = output / CHECKPOINT_DIR
        tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_adapter(accelerator.unwrap_model(module).lm, adapter, tmp)
        state = {"optimizer": optim, "scheduler": scheduler.state_dict()}
        torch.save(state, tmp / TRAINING_STATE_FILE)
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **schedule}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in saved_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Any,
    module: nn.Module,
    optimizer: Any,
    scheduler: Any,
    output: Path,
    schedule: dict[str, Any],
) -> int:
    """Restore the latest checkpoint under ``output`` into the prepared module, optimizer and
    scheduler; returns its step (0 when there is none).

    Refused (ValueError, on every rank, before anything is loaded) when the checkpoint's adapter
    tensors are not exactly this module's trainable parameters, or when this run's data plan
    would take other optimizer steps than the run that wrote it (another world size, batch size
    or accumulation that splits the examples differently): ``schedule["steps"]``, the plan's
    `DataPlan.signature`, must match.
    """
    names = trainable_names(accelerator.unwrap_model(module))
    header: dict[str, Any] | None = None
    adapter: dict[str, Tensor] = {}
    optim: dict[str, Any] = {}
    if accelerator.is_main_process:
        found = saved_checkpoints(output)
        if found:
            header, adapter, optim = _read_checkpoint(found[-1], names, schedule)
    header = broadcast_object_list([header])[0]
    if header is None:
        logger.warning("--resume: no checkpoint under %s; starting from scratch", output)
        return 0
    if header["error"]:
        raise ValueError(header["error"])
    distributed = accelerator.num_processes > 1
    set_model_state_dict(
        module,
        {names[key]: tensor for key, tensor in adapter.items()},
        # strict=False: the frozen base is not in the checkpoint; the adapter's keys were
        # checked to be exactly the trainable parameters above.
        options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=distributed, strict=False
        ),
    )
    set_optimizer_state_dict(
        module,
        _unwrapped_optimizer(optimizer),
        optim,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed),
    )
    scheduler.load_state_dict(header["scheduler"])
    logger.info("resumed from %s (step %d)", header["path"], header["step"])
    return int(header["step"])


def _read_checkpoint(
    path: Path, names: dict[str, str], schedule: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """The header broadcast to every rank (step, scheduler state, or the error refusing the
    checkpoint), the adapter tensors by peft name and the optimizer state."""
    saved = json.loads((path / STATE_FILE).read_text())
    header: dict[str, Any] = {"path": str(path), "step": saved["step"], "error": None}
    if saved.get("steps") != schedule["steps"]:
        split = {key: saved.get(key, "?") for key in ("world_size", "batch_size", "grad_accum")}
        header["error"] = (
            f"--resume: {path} was written by {split['world_size']} process(es) with "
            f"batch_size={split['batch_size']}, grad_accum={split['grad_accum']}; "
            f"this run ({schedule['world_size']} process(es), batch_size={schedule['batch_size']}, "
            f"grad_accum={schedule['grad_accum']}) would take other optimizer steps: resume with "
            "those settings, or another split where processes x batch_size x grad_accum is the "
            "same and divides every epoch's examples evenly"
        )
        return header, {}, {}
    adapter = load_file(str(path / ADAPTER_FILE))
    missing, extra = sorted(set(names) - set(adapter)), sorted(set(adapter) - set(names))
    if missing or extra:
        header["error"] = (
            f"--resume: the adapter in {path} does not match this run's LoRA parameters "
            f"(missing {', '.join(missing[:3]) or 'none'}; unexpected "
            f"{', '.join(extra[:3]) or 'none'}): resume with the model and lora_targets it was "
            "trained with"
        )
        return header, {}, {}
    state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    header["scheduler"] = state["scheduler"]
    return header, adapter, state["optimizer"]


class MetricsLog:
    """metrics.jsonl on the main process, trimmed to the resumed step on --resume."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        if enabled and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if json.loads(line)["step"] <= start_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
