"""The adapter directory's README.md: a model card a person can read and act on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibft import distributions
from calibft.eval import load_benchmark
from calibft.eval.report import headline_table
from calibft.files import atomic_write_text
from calibft.lm.load import ALIAS_ORIGINS
from calibft.train.config import TrainConfig


def base_model_name(model: str) -> str:
    """The base model by its published name where calibft knows it (aliases), else as given."""
    return ALIAS_ORIGINS.get(model, model)


def render_model_card(config: TrainConfig, report: Mapping[str, Any] | None) -> str:
    base = base_model_name(config.model)
    only_targets = bool(config.targets) and not config.families
    if config.families and config.families != ["all"]:
        families = ", ".join(config.families)
    else:
        count = len(distributions.families("train"))
        families = "no numeric family" if only_targets else f"all {count} training families"
    if config.targets:
        families += f"; categorical targets from {', '.join(config.targets)}"
    if config.prompts_per_family:
        unit = "family or group" if config.targets else "family"
        per_family = f"{config.prompts_per_family} evenly spaced prompts per {unit}"
    else:
        per_family = "every prompt" if only_targets else "every grid prompt"
    if not only_targets:  # how numeric laws are discretized (a list of answers is taken whole)
        per_family += (
            f"; answers with {config.decimals} decimals, at most {config.max_bins} values per "
            "prompt"
        )
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags: [lora, calibration, calibft]",
        "---",
        "",
        f"# Calibration LoRA adapter for {base}",
        "",
        "Trained with calibft to *sample* from the distribution a prompt asks for "
        '("Generate exactly ONE random number from a Gamma distribution with parameters alpha=2, '
        'beta=1.5. Output ONLY the number.") instead of repeating a few favourite answers '
        "(calibration fine-tuning, Baldelli et al., 2026).",
        "",
        "## Recipe",
        "",
        f"- Base model: `{base}`"
        + (f" (calibft alias `{config.model}`)" if base != config.model else ""),
        f"- Method: `{config.method}` — "
        + (
            "KL between the model's next-token distribution and the exact next-token "
            "distribution of the discretized target law, along one sampled answer per prompt"
            if config.method == "soft"
            else "cross-entropy on answers sampled from the discretized target law"
        ),
        f"- Data: {families}; {per_family}; {config.repeats} sample(s) per prompt per epoch",
        f"- Optimisation: {config.epochs} epochs, batch {config.batch_size} x "
        f"{config.grad_accum} accumulation, AdamW lr {config.lr:g}, weight decay "
        f"{config.weight_decay:g}, warmup {config.warmup_ratio:g}, cosine",
        f"- LoRA: r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout:g} on "
        f"{', '.join(config.lora_targets)}; seed {config.seed}",
        "- The full resolved configuration is in `train_config.json`, the loss curve in "
        "`metrics.jsonl`.",
        "",
    ]
    if report is not None:
        names = list(report["benchmarks"])
        lines += [
            "## Before / after",
            "",
            f"`calibft eval {' '.join(names)}` after training, on held-out prompts never seen in "
            "training (settings: `eval/report.json` beside this card; docs/benchmarks/):",
            "",
            headline_table(report, {name: load_benchmark(name) for name in names}),
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(model, "path/to/this/directory")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
        "Sample with temperature 1 and no top-p / top-k truncation: the adapter is trained so "
        "that the model's own distribution is the requested one. Measure it with",
        "`calibft eval --model " + config.model + " --adapter path/to/this/directory`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output: Path, config: TrainConfig, report: Mapping[str, Any] | None) -> None:
    atomic_write_text(Path(output) / "README.md", render_model_card(config, report))
