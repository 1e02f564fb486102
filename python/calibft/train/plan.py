"""`calibft train --dry-run`: a per-GPU memory plan of a training run from its config alone.

The model is built on the meta device from its config (no weights are read or downloaded), wrapped
with LoRA exactly as training wraps it, and its parameters are counted. Activations are measured
by running the decoder's forward on meta tensors of the configured batch and sequence length and
adding up every tensor autograd saves for the backward pass; attention is counted as a fused
kernel (FlashAttention / SDPA memory-efficient) saves it. How each part is formed and its
expected error: docs/plan.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from calibft.files import atomic_write_text
from calibft.losses import LOGIT_BYTES, default_chunk_size
from calibft.train.config import TrainConfig

logger = logging.getLogger("calibft.train")

STRATEGIES = ("single", "ddp", "fsdp1", "fsdp2")
PLAN_FILE = "plan.json"
GIB = 1 << 30
DEFAULT_GPU_MEMORY_GIB = 80.0
CUDA_CONTEXT_GIB = 1.0
"""CUDA context, cuBLAS workspaces and NCCL buffers: outside PyTorch's allocator, about 0.5-1 GiB
per process on A100/H100 (docs/plan.md)."""


@dataclass(frozen=True)
class MemoryPlan:
    """What `plan.json` holds: sizes of the run and its estimated per-GPU peak, in GiB."""

    model: str
    model_type: str
    total_params: int
    trainable_params: int
    dtype: str
    strategy: str
    num_processes: int
    batch_size: int
    max_seq_len: int
    gradient_checkpointing: bool
    per_gpu_peak_gib: float
    parts_gib: dict[str, float]
    gpu_memory_gib: float

    @property
    def fits(self) -> bool:
        return self.per_gpu_peak_gib <= self.gpu_memory_gib

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.parts_gib.items())
        return [
            f"model {self.model} ({self.model_type}): {self.total_params:,} parameters, "
            f"{self.trainable_params:,} trainable (LoRA)",
            f"{self.strategy} on {self.num_processes} process(es), {self.dtype} weights, batch "
            f"{self.batch_size} x {self.max_seq_len} tokens, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}",
            f"per-GPU peak {self.per_gpu_peak_gib:.2f} GiB of {self.gpu_memory_gib:g} ({parts})",
        ]


def launched_strategy(env: Mapping[str, str]) -> tuple[str, int]:
    """The strategy and process count `accelerate launch` (or torchrun) set in ``env``; one process,
    'single', when not launched."""
    num = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return ("fsdp2" if env.get("FSDP_VERSION", "1") == "2" else "fsdp1"), num
    return ("ddp" if num > 1 else "single"), num


@dataclass(frozen=True)
class ModelSizes:
    """What the plan needs from the meta-device model of a config, whatever the strategy."""

    model_type: str
    total_params: int
    trainable_params: int
    frozen_bytes: int
    root_bytes: int  # parameters outside the decoder layers (embeddings, norm, head, vision)
    layer_bytes: int  # the largest decoder layer's parameters
    num_layers: int
    hidden_size: int
    vocab_size: int
    saved_bytes: int  # tensors the traced forward keeps for backward


def model_sizes(config: TrainConfig) -> ModelSizes:
    """Build the run's module on the meta device, count it and trace its forward."""
    module, skeleton = meta_trainable_module(config, planned_dtype(config))
    params = list(module.parameters())
    layers = decoder_layers(skeleton)
    text = skeleton.config.get_text_config()
    return ModelSizes(
        model_type=str(skeleton.config.model_type),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        frozen_bytes=sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
        root_bytes=_param_bytes(module) - sum(_param_bytes(m) for m in layers),
        layer_bytes=max((_param_bytes(m) for m in layers), default=0),
        num_layers=len(layers),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        saved_bytes=traced_activation_bytes(module, config.batch_size, config.max_seq_len),
    )


def memory_plan(
    config: TrainConfig,
    *,
    strategy: str | None = None,
    num_processes: int | None = None,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    env: Mapping[str, str] | None = None,
    sizes: ModelSizes | None = None,
) -> MemoryPlan:
    """The per-GPU memory plan of training ``config`` (see the module docstring); ``sizes``:
    `model_sizes(config)` when already measured (plans of several strategies share it)."""
    launched, launched_num = launched_strategy(os.environ if env is None else env)
    strategy = strategy or launched
    num = num_processes or (1 if strategy == "single" else launched_num)
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if num < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num}")
    if strategy == "single" and num != 1:
        raise ValueError(f"strategy single runs one process; pass --strategy ddp/fsdp2 for {num}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib must be > 0, got {gpu_memory_gib}")
    dtype = planned_dtype(config)
    m = sizes or model_sizes(config)
    lora_bytes = 4 * m.trainable_params  # LoRA weights, gradients and Adam moments stay in fp32
    if config.gradient_checkpointing:
        # Kept: every layer's input; recomputed in backward: one layer's saved tensors at a time.
        tokens = config.batch_size * config.max_seq_len
        inputs = m.num_layers * tokens * m.hidden_size * getattr(torch, dtype).itemsize
        activations = inputs + m.saved_bytes / max(1, m.num_layers)
    else:
        activations = m.saved_bytes

    shard = num if strategy.startswith("fsdp") else 1
    weights = (m.frozen_bytes + lora_bytes) / shard
    if shard > 1:
        # Gathered at once: the root unit (embeddings, final norm, head: not resharded between
        # forward and backward) and two decoder layers (the running one and the prefetched one).
        weights += m.root_bytes * (shard - 1) / shard + 2 * m.layer_bytes
    gradients = lora_bytes / shard
    if strategy == "ddp":
        gradients += lora_bytes  # DDP's reducer buckets hold a second copy
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": 2 * lora_bytes / shard,
        "activations": activations,
        "loss_buffers": loss_buffer_bytes(config, m.hidden_size, m.vocab_size, dtype),
    }
    parts_gib = {k: round(v / GIB, 6) for k, v in parts.items()}
    parts_gib["cuda_context"] = CUDA_CONTEXT_GIB
    return MemoryPlan(
        model=config.model,
        model_type=m.model_type,
        total_params=m.total_params,
        trainable_params=m.trainable_params,
        dtype=dtype,
        strategy=strategy,
        num_processes=num,
        batch_size=config.batch_size,
        max_seq_len=config.max_seq_len,
        gradient_checkpointing=config.gradient_checkpointing,
        per_gpu_peak_gib=round(sum(parts.values()) / GIB + CUDA_CONTEXT_GIB, 6),
        parts_gib=parts_gib,
        gpu_memory_gib=float(gpu_memory_gib),
    )


def planned_dtype(config: TrainConfig) -> str:
    """The base model's dtype on a GPU (the config's ``dtype``, 'auto' being bfloat16)."""
    return config.resolved_dtype(cuda=True)


def meta_config(name: str) -> Any:
    """The model's transformers config, read without weights (a GGUF file: its metadata only)."""
    from transformers import AutoConfig

    from calibft.lm.load import resolve_model

    source = resolve_model(name)
    try:
        if source.gguf is not None:
            return AutoConfig.from_pretrained(str(source.gguf.parent), gguf_file=source.gguf.name)
        return AutoConfig.from_pretrained(str(source.pretrained))
    except (OSError, ValueError) as err:
        raise ValueError(f"model {name!r}: its config could not be read: {err}") from err


def meta_trainable_module(config: TrainConfig, dtype: str) -> tuple[Any, Any]:
    """The module training builds (LoRA on the frozen base), on the meta device, and its base."""
    from transformers import AutoModelForCausalLM

    from calibft.lm.attention import attention_implementation
    from calibft.train.loop import check_model, trainable_module

    model_config = meta_config(config.model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            model_config,
            dtype=getattr(torch, dtype),
            attn_implementation=attention_implementation(model_config),
        )
    check_model(skeleton, config)
    # Built without checkpointing: the trace needs every layer's saved tensors (checkpointing is
    # modelled from them in `memory_plan`).
    module = trainable_module(skeleton, dataclasses.replace(config, gradient_checkpointing=False))
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return module, skeleton


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: instances of the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def loss_buffer_bytes(config: TrainConfig, hidden: int, vocab: int, dtype: str) -> int:
    """The fused loss at its worst case, every position supervised: the selected hidden states and
    their gradient ([P, H] each) and one chunk of logits buffers (`calibft.losses.LOGIT_BYTES`
    per element: the product, its float32 copy, the soft-cap slope)."""
    positions = config.batch_size * config.max_seq_len
    rows = min(config.chunk_size or default_chunk_size(positions, vocab), positions)
    return 2 * positions * hidden * getattr(torch, dtype).itemsize + rows * vocab * LOGIT_BYTES


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA during the trace: keeps for backward what FlashAttention and SDPA's
    memory-efficient kernel keep (q, k, v, the output and a float32 logsumexp per row), where the
    meta device would run SDPA's math path and keep the full attention matrix."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise NotImplementedError("only traced, never differentiated")


class _MetaTrace(TorchFunctionMode):
    """SDPA becomes `_FusedAttention`; a truth test of a meta tensor (the mask builders asking
    "is there no padding?", "are the sequences unpacked?") answers yes: a full, unpadded batch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        if func is Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **kwargs)


@contextlib.contextmanager
def _saved_tensors(params: set[int], found: dict[int, Tensor]) -> Iterator[None]:
    def pack(t: Tensor) -> Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:
            found.setdefault(id(base), base)  # the reference keeps ids from being reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def traced_activation_bytes(module: nn.Module, batch: int, seq_len: int) -> int:
    """Bytes autograd keeps for the backward pass of the decoder's forward on a [batch, seq_len]
    batch (on meta tensors: nothing is computed), parameters and their views excluded."""
    causal_lm = cast(Any, module).lm.get_base_model()
    params = {id(p) for p in module.parameters()}
    found: dict[int, Tensor] = {}
    ids = torch.zeros((batch, seq_len), dtype=torch.long, device="meta")
    try:
        with _saved_tensors(params, found), _MetaTrace():
            causal_lm.get_decoder()(input_ids=ids, use_cache=False)
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(
            f"--dry-run: the {causal_lm.config.model_type} decoder cannot run on the meta device "
            f"({str(err).splitlines()[0]}); its activations cannot be planned"
        ) from err
    return sum(t.numel() * t.element_size() for t in found.values())


def write_plan(plan: MemoryPlan, output: Path) -> Path:
    """Write ``output/plan.json`` atomically; returns its path."""
    path = output / PLAN_FILE
    atomic_write_text(path, json.dumps(plan.to_dict(), indent=1) + "\n")
    return path


def dry_run(config: TrainConfig, **options: Any) -> tuple[MemoryPlan, Path | None]:
    """Plan, print, warn when the peak exceeds the GPU, and write the plan (rank 0 only)."""
    plan = memory_plan(config, **options)
    for line in plan.lines():
        print(line)
    if not plan.fits:
        logger.warning(
            "the estimated per-GPU peak %.1f GiB exceeds --gpu-memory-gib %g: use more processes "
            "with fsdp2, gradient_checkpointing=true, or a smaller batch_size / max_seq_len",
            plan.per_gpu_peak_gib,
            plan.gpu_memory_gib,
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return plan, None
    return plan, write_plan(plan, Path(config.output))


__all__ = [
    "STRATEGIES",
    "MemoryPlan",
    "ModelSizes",
    "dry_run",
    "launched_strategy",
    "memory_plan",
    "model_sizes",
]
