"""Sampling and greedy decoding through vLLM, every request carrying its checkpoint's adapter.

The authors' vLLM pipeline evaluated every checkpoint with the base weights; here each request of
an adapter's session passes that adapter as a `LoRARequest`. Scoring (log-likelihoods, exact
passes) stays on the transformers model of the wrapped `HFBackend`.

The engine is set up to start where the defaults would not: the LoRA rank rounded up to one vLLM
accepts, bfloat16 weights (its LoRA kernels take no float32), a memory share sized from what is
free once the scoring model is loaded, a context no longer than the run needs, and the same stop
rule as the transformers sampler (the end ids only; the model's EOS list is ignored).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibft.config import option
from calibft.lm.adapters import Checkpoint, write_scaled_adapter
from calibft.lm.decode import PromptState
from calibft.lm.session import HFBackend, HFSession

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts as `max_lora_rank` (`MaxLoRARanks` in vllm/config/lora.py)."""

DEFAULT_MAX_MODEL_LEN = 4096
"""Context of the engine when the run does not say: every benchmark's prompt plus its longest
generation (SSOT's 2048 tokens) fits, and the KV cache is sized for it, not the model's 128k."""

MEMORY_MARGIN = 0.9
"""Share of the free GPU memory that vLLM is asked to take (the rest: the allocator's slack)."""


@dataclass
class VLLMOptions:
    """The vLLM engine's settings (the transformers model's are the backend's own)."""

    tensor_parallel_size: int = option(1, "GPUs one vLLM engine spans (tensor parallel)", min=1)
    gpu_memory_utilization: float | None = option(
        None,
        "share of each GPU's memory vLLM takes (default: 0.9 of what is free when it starts)",
        above=0,
        max=1,
    )
    max_model_len: int | None = option(
        None, "longest prompt + generation (default: the run's need, else 4096)", min=1
    )
    dtype: str = option(
        "bfloat16", "vLLM weights (its LoRA kernels need 16 bits)", choices=("bfloat16", "float16")
    )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt's generation: `n` samples at temperature 1 drawn with `seed`, or, with `seed`
    None, the greedy completion (n must then be 1)."""

    ids: tuple[int, ...]
    n: int
    max_new_tokens: int
    seed: int | None = None


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")


def _free_and_total(index: int) -> tuple[int, int] | None:
    """Free and total bytes of GPU `index`; None without CUDA."""
    return torch.cuda.mem_get_info(index) if torch.cuda.is_available() else None


def memory_utilization(tensor_parallel_size: int) -> float | None:
    """`gpu_memory_utilization` from what is free on the GPUs the engine will use (0 ..
    tensor_parallel_size - 1): vLLM refuses to start if its share of the total exceeds what is
    free, which a fixed 0.5 did whenever the scoring model took half the GPU. None without CUDA
    (vLLM's CPU backend sizes its cache otherwise)."""
    memory = [_free_and_total(index) for index in range(tensor_parallel_size)]
    if None in memory:
        return None
    share = min(MEMORY_MARGIN * free / total for free, total in memory)  # type: ignore[misc]
    if share < 0.05:
        raise ValueError(
            f"vllm: only {share:.0%} of a GPU's memory is free for the engine; put the scoring "
            "model on another GPU (device=cuda:N past the engine's GPUs) or free memory"
        )
    return round(share, 4)


def _completion(token_ids: Sequence[int], end_ids: set[int]) -> list[int]:
    """A vLLM output up to its first end token (vLLM keeps a non-special stop token)."""
    out = []
    for token in token_ids:
        if token in end_ids:
            break
        out.append(int(token))
    return out


@dataclass
class VLLMSession(HFSession):
    """`HFSession` whose generation goes through a vLLM engine."""

    engine: Any = None
    lora: Any = None  # the checkpoint's LoRARequest, None for the base model
    max_model_len: int = DEFAULT_MAX_MODEL_LEN

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[list[int]]]:
        """Each request's completions, all requests submitted in one `generate` call so that
        vLLM batches them."""
        from vllm import SamplingParams

        params = []
        for request in requests:
            if len(request.ids) + request.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"vllm: a prompt of {len(request.ids)} tokens plus {request.max_new_tokens} "
                    f"new ones exceeds max_model_len={self.max_model_len}; raise max_model_len"
                )
            sampling = dict(temperature=1.0, top_p=1.0, top_k=0, seed=request.seed)
            if request.seed is None:
                sampling = dict(temperature=0.0)
            params.append(
                SamplingParams(
                    n=request.n,
                    max_tokens=request.max_new_tokens,
                    stop_token_ids=list(self.end_ids),
                    ignore_eos=True,  # stop on the end ids only, as the transformers sampler
                    detokenize=False,
                    **sampling,
                )
            )
        prompts = [{"prompt_token_ids": list(request.ids)} for request in requests]
        results = self.engine.generate(
            prompts, params, lora_request=self.lora, use_tqdm=self.progress
        )
        ends = set(self.end_ids)
        return [[_completion(out.token_ids, ends) for out in result.outputs] for result in results]

    def sample(
        self, state: PromptState, n: int, *, seed: int, max_new_tokens: int
    ) -> list[list[int]]:
        return self.generate([GenerationRequest(state.ids, n, max_new_tokens, seed)])[0]

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return self.generate([GenerationRequest(tuple(ids), 1, max_new_tokens)])[0][0]

    def greedy_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        requests = [GenerationRequest(tuple(ids), 1, max_new_tokens) for ids in prompts]
        return [rows[0] for rows in self.generate(requests)]

    def sample_many(
        self,
        prompts: Sequence[Sequence[int]],
        counts: Sequence[int],
        seeds: Sequence[int],
        max_new_tokens: int,
    ) -> list[list[list[int]]]:
        return self.generate(
            [
                GenerationRequest(tuple(ids), n, max_new_tokens, seed)
                for ids, n, seed in zip(prompts, counts, seeds, strict=True)
            ]
        )


class VLLMBackend(HFBackend):
    """An `HFBackend` plus one vLLM engine with LoRA enabled for the run's adapters."""

    def __init__(
        self,
        model_name: str,
        checkpoints: Sequence[Checkpoint],
        *,
        seed: int = 0,
        vllm: VLLMOptions | None = None,
        max_model_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        """`max_model_len`: the run's longest prompt plus generation, used when the options do
        not set one. `kwargs` go to `HFBackend` (the scoring model: dtype, device, ...)."""
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ValueError(
                "backend 'vllm' needs the vllm package (pip install 'calibft[vllm]')"
            ) from err
        options = vllm or VLLMOptions()
        super().__init__(model_name, checkpoints, **kwargs)  # the scoring model loads first
        adapters = [c for c in checkpoints if c.adapter is not None]
        ranks = [json.loads((c.adapter / "adapter_config.json").read_text())["r"] for c in adapters]  # type: ignore[operator]
        self.max_model_len = options.max_model_len or max_model_len or DEFAULT_MAX_MODEL_LEN
        utilization = options.gpu_memory_utilization or memory_utilization(
            options.tensor_parallel_size
        )
        engine_args: dict[str, Any] = dict(
            model=self.model_id,
            dtype=options.dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            tensor_parallel_size=options.tensor_parallel_size,
            enable_lora=bool(adapters),
        )
        if adapters:
            engine_args |= dict(max_lora_rank=lora_rank_slot(max(ranks)), max_loras=len(adapters))
        if utilization is not None:
            engine_args["gpu_memory_utilization"] = utilization
        # vLLM takes no LoRA scale: a scaled checkpoint is served from a copy with lora_B scaled
        # (written before the engine starts; kept for the backend's lifetime).
        self._scaled = tempfile.TemporaryDirectory(prefix="calibft-scaled-")
        paths = {
            c.name: c.adapter
            if c.scale == 1
            else write_scaled_adapter(c, Path(self._scaled.name) / str(i))
            for i, c in enumerate(adapters)
        }
        self.engine = LLM(**engine_args)
        self._loras = {
            c.name: LoRARequest(c.name, i + 1, str(paths[c.name])) for i, c in enumerate(adapters)
        }

    def session(self, checkpoint: Checkpoint) -> VLLMSession:
        hf = super().session(checkpoint)
        return VLLMSession(
            hf.model,
            hf.tokenizer,
            hf.chat,
            hf.end_ids,
            hf.sample_batch_size,
            hf.progress,
            engine=self.engine,
            lora=self._loras.get(checkpoint.name),
            max_model_len=self.max_model_len,
        )
