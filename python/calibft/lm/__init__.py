"""How a model answers: loading, adapters, and the `LM` backend every benchmark uses."""

from typing import Any

from calibft.lm.adapters import BASE, Checkpoint, resolve_checkpoints
from calibft.lm.decode import PromptState
from calibft.lm.session import DTYPES, LM, HFBackend, HFSession
from calibft.lm.vllm import VLLMBackend, VLLMSession

BACKENDS = ("hf", "vllm")


def open_backend(
    name: str, model: str, checkpoints: list[Checkpoint], *, seed: int, **options: Any
) -> HFBackend:
    """The run's backend: 'hf' (transformers) or 'vllm' (generation through vLLM, scoring through
    transformers)."""
    if name == "vllm":
        return VLLMBackend(model, checkpoints, seed=seed, **options)
    return HFBackend(model, checkpoints, **options)


__all__ = [
    "BACKENDS",
    "BASE",
    "DTYPES",
    "LM",
    "Checkpoint",
    "HFBackend",
    "HFSession",
    "PromptState",
    "VLLMBackend",
    "VLLMSession",
    "open_backend",
    "resolve_checkpoints",
]
