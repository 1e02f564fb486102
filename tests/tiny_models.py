"""Tiny tokenizers and models built locally, so no test touches a model hub.

API (shared by all test files; keep it stable):
    tiny_tokenizer(tmp_path) -> PreTrainedTokenizerFast   the package's (calibft.doctor.tiny):
        byte-level BPE, digits single tokens, ChatML template ending turns with <|im_end|>
    tiny_model(tokenizer, arch="llama" | "qwen2", seed=0) -> PreTrainedModel   random init, float32
    tiny_model_dir(tmp_path, arch="llama") -> Path   model + tokenizer saved as a local model
        directory
    CannedSession(model, tokenizer, chat, end_ids, texts=...)   an HFSession whose sample() returns
        the token ids of canned texts, in turn (and records each call)
    teacher_forced_logprob(model, prompt_ids, completion) -> float   the reference sequence log-prob
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from calibft.doctor.tiny import CHATML_TEMPLATE, tiny_tokenizer  # noqa: F401 (re-exported)
from calibft.lm import HFSession


def tiny_model(
    tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 0
) -> PreTrainedModel:
    """A 2-layer random-init causal LM; its vocabulary is padded past ``len(tokenizer)`` as real
    models' often are."""
    common = dict(
        vocab_size=(len(tokenizer) + 15) // 16 * 16 + 16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
        elif arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
        else:
            raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    return model.eval()


def tiny_model_dir(tmp_path: Path, arch: str = "llama") -> Path:
    """A local model directory (config, weights, tokenizer) that ``--model DIR`` can load."""
    path = Path(tmp_path) / f"tiny-{arch}"
    tokenizer = tiny_tokenizer(path)
    tiny_model(tokenizer, arch).save_pretrained(path)
    return path


@dataclass
class CannedSession(HFSession):
    """A tiny-model session whose `sample` returns the token ids of canned texts, in turn."""

    texts: tuple[str, ...] = ()
    calls: list = field(default_factory=list)

    def sample(self, state, n, *, seed, max_new_tokens):
        self.calls.append(
            {"ids": state.ids, "n": n, "seed": seed, "max_new_tokens": max_new_tokens}
        )
        encode = self.tokenizer.encode
        return [encode(self.texts[i % len(self.texts)], add_special_tokens=False) for i in range(n)]


def teacher_forced_logprob(
    model: PreTrainedModel, prompt_ids: list[int], completion: list[int]
) -> float:
    """log p(completion | prompt) from one plain forward pass over prompt + completion (float64)."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(completion))


def free_port() -> int:
    """A free TCP port on the loopback interface, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command that runs `args` (``-m module ...`` or a script and its arguments) on `nproc`
    local ranks through torch's own launcher, rendezvous on a free loopback port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]
