"""`calibft train --dry-run`: the memory plan from a config-only model directory (docs/plan.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from calibft.cli import main
from calibft.doctor.tiny import family_config, tiny_tokenizer
from calibft.train.config import TrainConfig
from calibft.train.plan import launched_strategy, memory_plan, model_sizes

# Published config.json values (Qwen/Qwen3-8B; google/gemma-3-27b-it, its text and vision parts).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
    "mm_tokens_per_image": 256,
    "text_config": {
        "model_type": "gemma3_text",
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "torch_dtype": "bfloat16",
}


def config_dir(path: Path, values: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    tiny = family_config(tiny_tokenizer(), "llama").to_dict()
    return {
        "tiny": config_dir(root / "tiny", tiny),
        "qwen3-8b": config_dir(root / "qwen3-8b", QWEN3_8B),
        "gemma3-27b": config_dir(root / "gemma3-27b", GEMMA3_27B),
    }


def meta_counts(path: Path, targets: list[str], r: int) -> tuple[int, int, int]:
    """(all parameters, LoRA parameters on the language model's targets, the same plus a vision
    tower's) of the model on the meta device, counted without peft: r * (in + out) per target."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    text = vision = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            count = r * (module.in_features + module.out_features)
            vision += count
            text += 0 if "vision" in name else count
    return sum(p.numel() for p in model.parameters()), text, vision


@pytest.mark.parametrize("shape", ["tiny", "qwen3-8b", "gemma3-27b"])
def test_counts_equal_a_meta_device_count(shapes, shape, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = TrainConfig(model=str(shapes[shape]), lora_r=16)
    plan = memory_plan(config, env={})
    total, text, with_vision = meta_counts(shapes[shape], config.lora_targets, 16)
    assert plan.total_params == total + plan.trainable_params
    assert text <= plan.trainable_params <= with_vision
    assert (plan.strategy, plan.num_processes, plan.dtype) == ("single", 1, "bfloat16")
    if shape == "qwen3-8b":  # Qwen's published figure: 8.2B parameters
        assert total == pytest.approx(8.19e9, rel=0.01) and plan.trainable_params == text
    if shape == "gemma3-27b":  # Google's: 27B (27.4B with the vision tower)
        assert total == pytest.approx(27.4e9, rel=0.01)


@pytest.mark.parametrize("shape", ["tiny", "qwen3-8b", "gemma3-27b"])
def test_fsdp_below_ddp_below_fp32_single(shapes, shape):
    config = TrainConfig(model=str(shapes[shape]), batch_size=4, max_seq_len=256)
    sizes = model_sizes(config)  # one meta model and trace for the three bf16 plans
    fsdp = memory_plan(config, strategy="fsdp2", num_processes=8, env={}, sizes=sizes)
    fsdp1 = memory_plan(config, strategy="fsdp1", num_processes=8, env={}, sizes=sizes)
    ddp = memory_plan(config, strategy="ddp", num_processes=8, env={})
    assert ddp.parts_gib["activations"] == fsdp.parts_gib["activations"]  # measured alike
    fp32 = memory_plan(TrainConfig(**{**config.to_dict(), "dtype": "float32"}), env={})
    assert fsdp.per_gpu_peak_gib == fsdp1.per_gpu_peak_gib
    assert fsdp.per_gpu_peak_gib < ddp.per_gpu_peak_gib < fp32.per_gpu_peak_gib
    # bf16 halves the frozen weights; activations are the same tensors at half the bytes or less.
    # (A tiny model's weights are mostly embeddings, kept whole by FSDP, and fp32 LoRA.)
    if shape != "tiny":
        assert fsdp.parts_gib["weights"] < ddp.parts_gib["weights"] / 2
        assert ddp.parts_gib["weights"] < 0.51 * fp32.parts_gib["weights"]
    assert ddp.parts_gib["activations"] < fp32.parts_gib["activations"]
    assert ddp.per_gpu_peak_gib == pytest.approx(sum(ddp.parts_gib.values()), abs=1e-5)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them(shapes):
    path = str(shapes["qwen3-8b"])
    small = memory_plan(TrainConfig(model=path, batch_size=2, max_seq_len=128), env={})
    large = memory_plan(TrainConfig(model=path, batch_size=4, max_seq_len=128), env={})
    ratio = large.parts_gib["activations"] / small.parts_gib["activations"]
    assert ratio == pytest.approx(2.0, rel=0.02)  # fused attention: linear in tokens
    gc = memory_plan(
        TrainConfig(model=path, batch_size=4, max_seq_len=128, gradient_checkpointing=True), env={}
    )
    assert gc.parts_gib["activations"] < large.parts_gib["activations"] / 5
    assert gc.parts_gib["weights"] == large.parts_gib["weights"]


def test_strategy_follows_accelerate_launch(shapes):
    config_only = TrainConfig(model=str(shapes["tiny"]))
    sizes = model_sizes(config_only)
    assert launched_strategy({}) == ("single", 1)
    assert launched_strategy({"WORLD_SIZE": "4"}) == ("ddp", 4)
    fsdp = {"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert launched_strategy(fsdp) == ("fsdp2", 8)
    assert launched_strategy({**fsdp, "FSDP_VERSION": "1"}) == ("fsdp1", 8)
    # A strategy given under a launcher keeps the launcher's process count.
    plan = memory_plan(config_only, strategy="fsdp2", env={"WORLD_SIZE": "4"}, sizes=sizes)
    assert (plan.strategy, plan.num_processes) == ("fsdp2", 4)
    assert memory_plan(config_only, env={"WORLD_SIZE": "4"}, sizes=sizes).strategy == "ddp"


def test_dry_run_cli_touches_only_the_config(shapes, tmp_path, monkeypatch, capsys, caplog):
    """The CLI plans a Gemma-3-27B run from a directory holding only config.json, offline, warns
    that one 80 GiB GPU is too small for DDP at this batch, and writes plan.json."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "RANK"):
        monkeypatch.delenv(name, raising=False)
    model = shapes["gemma3-27b"]
    output = tmp_path / "run"
    argv = ["train", "--dry-run", "--model", str(model), "--output", str(output)]
    assert main([*argv, "--strategy", "ddp", "--num-processes", "2", "batch_size=8"]) == 0
    plan = json.loads((output / "plan.json").read_text())
    assert {"total_params", "trainable_params", "dtype", "strategy", "num_processes"} <= set(plan)
    assert (plan["strategy"], plan["num_processes"], plan["fits"]) == ("ddp", 2, False)
    assert set(plan["parts_gib"]) == {
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "loss_buffers",
        "cuda_context",
    }
    assert "exceeds --gpu-memory-gib 80" in caplog.text
    assert f"per-GPU peak {plan['per_gpu_peak_gib']:.2f} GiB" in capsys.readouterr().out
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    assert sorted(p.name for p in output.iterdir()) == ["plan.json"]  # no adapter, no checkpoint

    caplog.clear()
    fits = ["--strategy", "fsdp2", "--num-processes", "8", "--gpu-memory-gib", "141"]
    assert main([*argv, *fits, "batch_size=1"]) == 0
    assert json.loads((output / "plan.json").read_text())["fits"] is True
    assert "exceeds" not in caplog.text


def test_plan_flags_without_dry_run_and_bad_values(shapes, tmp_path, capsys):
    model = str(shapes["tiny"])
    assert main(["train", "--model", model, "--strategy", "ddp"]) == 2
    assert "--strategy apply only with --dry-run" in capsys.readouterr().err
    out = str(tmp_path)
    base = ["train", "--dry-run", "--model", model, "--output", out]
    assert main([*base, "--strategy", "zero3"]) == 2
    assert "--strategy must be one of single, ddp, fsdp1, fsdp2" in capsys.readouterr().err
    assert main([*base, "--num-processes", "4"]) == 2  # single with 4 processes
    assert "strategy single runs one process" in capsys.readouterr().err
