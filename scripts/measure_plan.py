"""Measure `calibft train --dry-run`'s activation estimate against one real training step.

    python scripts/measure_plan.py [--device cpu|cuda] [--batch 4] [--seq-len 256]

Builds a random 8-layer, 512-wide Llama (no download), plans it with `memory_plan`, then runs one
forward and backward pass of the same LoRA module and prints, as JSON, the memory the step added
at its peak next to the plan's activations + gradients (docs/plan.md quotes the results). CUDA:
`torch.cuda.max_memory_allocated`. CPU: bytes malloc has handed out (glibc's mallinfo2, not RSS,
which keeps freed blocks), sampled after every operator.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from calibft.config import build
from calibft.train.config import TrainConfig
from calibft.train.loop import trainable_module
from calibft.train.plan import memory_plan


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        .split()
    ]  # fmt: skip


class PeakMemory(TorchDispatchMode):
    """Peak bytes in use on `device` since entering, sampled after every operator on a CPU."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        if device.type == "cpu":
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallinfo2.restype = _MallInfo2

    def used(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.peak = self.used()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.device.type == "cpu":
            self.peak = max(self.peak, self.used())
        return out

    def added_gib(self) -> float:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return (self.peak - self.start) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    device = torch.device(args.device)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    path = tempfile.mkdtemp(prefix="measure-plan-")
    config.save_pretrained(path)
    values = dict(model=path, batch_size=args.batch, max_seq_len=args.seq_len, dtype=args.dtype)
    train_config = build(TrainConfig, {**values, "lora_dropout": 0.0})
    plan = memory_plan(train_config, env={})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    module = trainable_module(model.to(device, getattr(torch, args.dtype)), train_config)
    for p in module.parameters():
        if p.requires_grad:  # as training keeps them
            p.data = p.data.float()
    decoder = module.lm.get_base_model().get_decoder()
    # A small step first, so that one-off allocations (threads, workspaces) are not measured.
    for shape in [(1, 8), (args.batch, args.seq_len)]:
        ids = torch.randint(0, config.vocab_size, shape, device=device)
        module.zero_grad(set_to_none=True)
        with PeakMemory(device) as meter:
            decoder(input_ids=ids).last_hidden_state.float().square().mean().backward()
    measured = meter.added_gib()
    planned = plan.parts_gib["activations"] + plan.parts_gib["gradients"]
    print(
        json.dumps(
            {
                "device": device.type,
                "dtype": args.dtype,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "measured_peak_gib": round(measured, 4),
                "planned_activations_and_gradients_gib": round(planned, 4),
                "measured_over_planned": round(measured / planned, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
