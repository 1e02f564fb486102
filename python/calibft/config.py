"""Training configuration: one dataclass, presets, config files and KEY=VALUE overrides.

Precedence, lowest first: dataclass defaults (the paper's soft-target recipe, SPEC §7), the preset,
the config file, then command-line overrides. Every value is validated before any heavy work.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

METHODS = ("soft", "hard")
MIXED_PRECISION = ("no", "bf16", "fp16")
PRESETS = ("quick", "paper-soft", "paper-hard")
CONFIG_FILE = "train_config.json"
"""Name of the resolved config that `calibft train` writes next to the adapter."""


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run depends on; the resolved copy is saved next to the adapter."""

    method: str = _field("soft", "objective: 'soft' (trie KL targets) or 'hard' (cross-entropy on sampled strings)")
    model: str = _field("smollm2-135m", "HF model id, local directory, .gguf file, or alias 'smollm2-135m'")
    output: str = _field("runs/train", "output directory (adapter, resolved config, metrics, checkpoints)")
    seed: int = _field(0, "seed for prompt order, target sampling, LoRA init and dropout")

    families: list[str] = _field([], "training families to use (empty: all 24 training families)")
    prompts_per_family: int = _field(0, "keep this many evenly spaced grid prompts per family (0: all)")
    decimals: int = _field(5, "decimals of continuous output values (SPEC §4; paper: 5)")
    max_bins: int = _field(1001, "maximum output-space size per prompt (paper: 1001 soft, 16384 hard)")
    repeats: int = _field(1, "samples per prompt per epoch, each a fresh draw (paper: 1 soft, 16 hard)")

    epochs: int = _field(3, "passes over the training prompts (paper: 3 soft, 2 hard)")
    batch_size: int = _field(8, "examples per device per optimizer step")
    grad_accum: int = _field(1, "gradient accumulation steps")
    lr: float = _field(2e-4, "AdamW peak learning rate")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    warmup_ratio: float = _field(0.03, "fraction of optimizer steps with linear warmup before cosine decay")
    max_grad_norm: float = _field(1.0, "gradient clipping norm (0: no clipping)")
    max_seq_len: int = _field(256, "longest allowed prompt + completion in tokens")
    temperature: float = _field(1.0, "softmax temperature of the soft-target KL (SPEC: 1)")
    token_mean: bool = _field(
        False, "hard only: average cross-entropy over all completion tokens of the batch (authors' code) "
        "instead of per sequence then over the batch (paper)"
    )

    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA alpha")
    lora_dropout: float = _field(0.05, "LoRA dropout")
    lora_targets: list[str] = _field(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters")

    mixed_precision: str = _field("no", "accelerate mixed precision: 'no', 'bf16' or 'fp16'")
    chunk_size: int = _field(0, "positions per chunk of the fused loss (0: automatic)")
    checkpoint_every: int = _field(50, "save a resumable checkpoint every N optimizer steps (0: never)")
    keep_checkpoints: int = _field(2, "how many recent checkpoints to keep")
    log_every: int = _field(1, "write a metrics.jsonl line every N optimizer steps")
    report_to: list[str] = _field([], "accelerate trackers to log to, e.g. ['tensorboard'] or ['wandb']")

    eval_per_family: int = _field(
        0, "after training, compare base and adapter on this many paper-selected OOD prompts per family (0: skip)"
    )
    eval_samples: int = _field(100, "generations per prompt of that comparison")

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first invalid field and its allowed range."""
        _one_of("method", self.method, METHODS)
        _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("epochs", "batch_size", "grad_accum", "repeats", "lora_r", "lora_alpha", "max_seq_len", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.eval_samples <= 0:
            raise ValueError(f"eval_samples must be a positive integer, got {self.eval_samples}")
        for name in ("prompts_per_family", "chunk_size", "checkpoint_every", "eval_per_family"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.decimals <= 12:
            raise ValueError(f"decimals must be in [0, 12], got {self.decimals}")
        if self.max_bins < 2:
            raise ValueError(f"max_bins must be >= 2, got {self.max_bins}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")
        if self.token_mean and self.method != "hard":
            raise ValueError("token_mean applies to method 'hard' only")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_help() -> dict[str, str]:
    """Each field's help text, for the CLI."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def preset_values(name: str) -> dict[str, Any]:
    """The overrides a named preset applies to the defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("calibft").joinpath("presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Values from a .toml, .yaml/.yml or .json file (a flat table of TrainConfig fields)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r}: use a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {str(path)!r} is not valid: {err}") from err
    except ImportError as err:
        raise ValueError("YAML config files need PyYAML (`pip install pyyaml`)") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of TrainConfig fields")
    return values


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings into raw values (typed later by ``build_config``)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like KEY=VALUE")
        values[key.strip()] = value
    return values


def build_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """Apply value layers (lowest precedence first) to the defaults, type them and validate."""
    types = typing.get_type_hints(TrainConfig)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in types:
                raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(types)}")
            merged[key] = _coerce(key, value, types[key])
    return TrainConfig(**merged).validate()


def load_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> TrainConfig:
    """The resolved configuration of a run.

    Without a preset, the recipe follows the method: ``paper-hard`` for ``method=hard`` (from any
    layer), else ``paper-soft``.
    """
    file_values = read_config_file(config_file) if config_file is not None else {}
    later = [file_values, dict(cli or {}), parse_overrides(overrides)]
    if preset is None:
        method = next((layer["method"] for layer in reversed(later) if "method" in layer), "soft")
        preset = "paper-hard" if method == "hard" else "paper-soft"
    return build_config(preset_values(preset), *later)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Type a value from a file or the command line; strings are parsed as the field's type."""
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typing.get_origin(kind) is list:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ValueError(f"config key {key!r} expects {name}, got {value!r}") from None
