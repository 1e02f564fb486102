"""Resumable training state: checkpoints (LoRA weights, optimizer, scheduler, RNG states, step)
written atomically through accelerate, and the metrics log trimmed to a resumed step."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from calibft.files import atomic_write_text

logger = logging.getLogger("calibft.train")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


def saved_checkpoints(output: Path) -> list[Path]:
    """The resumable checkpoints under `output`, oldest first."""
    root = output / CHECKPOINT_DIR
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def trainable_only(model: nn.Module, weights: list[dict[str, Tensor]]) -> None:
    """Keep checkpoints small: only the trainable (LoRA) tensors, not the frozen base model."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for state in weights:
        for key in [k for k in state if k not in trainable]:
            del state[key]


def save_checkpoint(accelerator: Any, output: Path, step: int, keep: int) -> None:
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
        for old in saved_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, output: Path) -> int:
    """Restore the latest checkpoint under ``output``; returns its step (0 when there is none)."""
    found = saved_checkpoints(output)
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
