"""Shared fixtures: the tiny tokenizer and its chat format, a tiny local model directory and a
LoRA adapter for it (no model hub).

The builders themselves live in `tiny_models` so test modules can also call them directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model_dir, tiny_tokenizer
from transformers import AutoModelForCausalLM

from calibft.chat import ChatFormat
from calibft.lm.adapters import peft_wrapping


def save_random_adapter(model, path: Path, seed: int = 0) -> Path:
    """A LoRA adapter (r=4 on q, v) with random non-zero weights, saved to `path`."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    with peft_wrapping():
        get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the tiny ChatML tokenizer, as a local model directory."""
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """A random LoRA adapter for `model_dir`, in a directory named soft-run."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return save_random_adapter(model, tmp_path_factory.mktemp("adapters") / "soft-run")


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny ChatML tokenizer, one per test module."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat.from_tokenizer(tokenizer)
