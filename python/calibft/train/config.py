"""Training configuration: `TrainConfig`, its presets, and how a run's values are resolved.

Precedence, lowest first: dataclass defaults (the paper's soft-target recipe, docs/method.md §7),
the preset, the config file, command-line flags, then ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from calibft.config import build, option, parse_overrides, read_config_file
from calibft.distributions import families
from calibft.targets.numeric import MAX_BINS_LIMIT, MAX_DECIMALS

METHODS = ("soft", "hard")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRESETS = ("quick", "paper-soft", "paper-hard", "quick-categorical")
_TRAIN_FAMILIES = len(families("train"))


@dataclass
class TrainConfig:
    """Everything a training run depends on; the resolved copy is saved next to the adapter."""

    method: str = option(
        "soft",
        "objective: 'soft' (trie KL targets) or 'hard' (cross-entropy on sampled strings)",
        choices=METHODS,
    )
    model: str = option(
        "smollm2-135m", "HF model id, local directory, .gguf file, or alias 'smollm2-135m'"
    )
    output: str = option(
        "runs/train", "output directory (adapter, resolved config, metrics, checkpoints)"
    )
    seed: int = option(
        0, "seed for prompt order, target sampling, LoRA init and dropout", min=0, max=2**63 - 1
    )

    families: list[str] = option(
        [],
        f"training families to use (empty: all {_TRAIN_FAMILIES} training families, or none when "
        f"targets are given; 'all': all {_TRAIN_FAMILIES} with the targets)",
    )
    targets: list[str] = option(
        [],
        "categorical target files (JSONL, JSON or YAML; docs/targets.md; shipped:train for the "
        "shipped set), alone or with the numeric families",
    )
    prompts_per_family: int = option(
        0, "keep this many evenly spaced prompts per family or categorical group (0: all)", min=0
    )
    decimals: int = option(
        5, "decimals of continuous output values (paper: 5)", min=0, max=MAX_DECIMALS
    )
    max_bins: int = option(
        1001,
        "maximum output-space size per prompt (paper: 1001 soft, 16384 hard)",
        min=2,
        max=MAX_BINS_LIMIT,
    )
    repeats: int = option(
        1, "samples per prompt per epoch, each a fresh draw (paper: 1 soft, 16 hard)", min=1
    )

    epochs: int = option(3, "passes over the training prompts (paper: 3 soft, 2 hard)", min=1)
    batch_size: int = option(8, "examples per device per optimizer step", min=1)
    grad_accum: int = option(1, "gradient accumulation steps", min=1)
    lr: float = option(2e-4, "AdamW peak learning rate", above=0)
    weight_decay: float = option(0.01, "AdamW weight decay", min=0)
    warmup_ratio: float = option(
        0.03, "fraction of optimizer steps with linear warmup before cosine decay", min=0, max=0.99
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", min=0)
    max_seq_len: int = option(256, "longest allowed prompt + completion in tokens", min=1)
    temperature: float = option(
        1.0, "softmax temperature of the soft-target KL (paper: 1)", above=0
    )
    token_mean: bool = option(
        False,
        "hard only: average cross-entropy over all completion tokens of the batch (authors' code) "
        "instead of per sequence then over the batch (paper)",
    )

    lora_r: int = option(16, "LoRA rank", min=1)
    lora_alpha: int = option(32, "LoRA alpha", min=1)
    lora_dropout: float = option(0.05, "LoRA dropout", min=0, max=0.99)
    lora_targets: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters"
    )

    retention_weight: float = option(
        0.0,
        "λ: weight of the retention term, KL(base ‖ model) on the base model's own continuations "
        "of replay prompts (0: the paper's objective; docs/method.md §9)",
        min=0,
    )
    retention_data: list[str] = option(
        [],
        'replay prompts: JSONL files ({"prompt": ...} per line) or text files (one prompt per '
        "line); empty: the shipped set of chat prompts and arithmetic word problems",
    )
    retention_batch_size: int = option(
        1,
        "replay examples per device per optimizer step (retention_weight > 0); one has up to "
        "retention_max_new_tokens positions, about as many as a batch of 8 numeric answers",
        min=1,
    )
    retention_top_k: int = option(
        32, "base tokens kept per replay position; the rest of its mass is one bucket", min=1
    )
    retention_max_new_tokens: int = option(
        48, "length of the base model's greedy continuation of each replay prompt", min=1
    )
    retention_eval_every: int = option(
        0,
        "every N optimizer steps (and before the first): bits per byte on a held-out text and "
        "greedy accuracy on held-out arithmetic word problems, in metrics.jsonl (0: never)",
        min=0,
    )

    dtype: str = option(
        "auto",
        "dtype the frozen base model loads in (LoRA weights stay float32): 'auto' (bfloat16 on "
        "CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'",
        choices=DTYPES,
    )
    mixed_precision: str = option(
        "auto",
        "accelerate mixed precision: 'auto' (bf16 on CUDA, no on CPU), 'no', 'bf16' or 'fp16'",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = option(
        False,
        "recompute decoder activations in the backward pass (less memory, one more forward "
        "pass per step)",
    )
    chunk_size: int = option(0, "positions per chunk of the fused loss (0: automatic)", min=0)
    checkpoint_every: int = option(
        50, "save a resumable checkpoint every N optimizer steps (0: never)", min=0
    )
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", min=1)
    log_every: int = option(1, "write a metrics.jsonl line every N optimizer steps", min=1)
    report_to: list[str] = option(
        [], "accelerate trackers to log to, e.g. ['tensorboard'] or ['wandb']"
    )

    eval: list[str] = option(
        [],
        "after training, run these benchmarks (calibft eval --list) on the base model and the "
        "adapter, e.g. structured,categorical; report in OUTPUT/eval, headline table in the model "
        "card (empty: skip)",
    )
    eval_config: str | None = option(
        None,
        "calibft eval config file of that comparison (default: the shipped "
        "presets/eval-after-training.toml: one OOD prompt per family and 100 generations without "
        "the exact pass; 2 categorical prompts per group, exact figures only)",
    )

    def check(self) -> None:
        """Rules between fields (each field's own bounds are checked by
        `calibft.config.validate`)."""
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")
        if self.token_mean and self.method != "hard":
            raise ValueError("token_mean applies to method 'hard' only")
        if self.retention_data and not self.retention_weight:
            raise ValueError("retention_data applies only with retention_weight > 0")
        if self.eval_config is not None and not self.eval:
            raise ValueError("eval_config applies only with eval=BENCH,... (benchmarks to run)")
        if self.eval:
            after_training_configs(self)  # an unknown benchmark or key fails before training

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_dtype(self, cuda: bool) -> str:
        """The base model's dtype on this device (`dtype` with 'auto' resolved)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if cuda else "float32"

    def resolved_mixed_precision(self, cuda: bool) -> str:
        """accelerate's mixed_precision on this device (`mixed_precision` with 'auto' resolved)."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if cuda else "no"


def after_training_configs(config: TrainConfig, output: str = "") -> tuple[Any, dict[str, Any]]:
    """The `calibft eval` settings of the after-training comparison: `config.eval`'s benchmarks
    configured by `config.eval_config` (default: the shipped after-training file), on the base
    model and the adapter in `output`."""
    from calibft.eval import load_benchmark
    from calibft.eval.config import resolve

    configs = {name: load_benchmark(name).Config for name in config.eval}
    shipped = resources.files("calibft").joinpath("presets", "eval-after-training.toml")
    with resources.as_file(shipped) as default:
        return resolve(
            configs,
            config_file=config.eval_config or default,
            flags={
                "model": config.model,
                "adapters": [output] if output else [],
                "seed": config.seed,
                "output": str(Path(output) / "eval") if output else "eval",
            },
        )


def preset_values(name: str) -> dict[str, Any]:
    """The overrides a named preset applies to the defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = (
        resources.files("calibft")
        .joinpath("presets")
        .joinpath(f"{name}.toml")
        .read_text(encoding="utf-8")
    )
    return tomllib.loads(text)


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
    return build(TrainConfig, preset_values(preset), *later)
