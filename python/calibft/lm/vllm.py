"""Sampling and greedy decoding through vLLM, every request carrying its checkpoint's adapter.

The authors' vLLM pipeline evaluated every checkpoint with the base weights; here each request of
an adapter's session passes that adapter as a `LoRARequest`. Scoring (log-likelihoods, exact
passes) stays on the transformers model of the wrapped `HFBackend`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from calibft.lm.adapters import Checkpoint
from calibft.lm.decode import PromptState
from calibft.lm.session import HFBackend, HFSession


@dataclass
class VLLMSession(HFSession):
    """`HFSession` whose generation goes through a vLLM engine."""

    engine: Any = None
    lora: Any = None  # the checkpoint's LoRARequest, None for the base model
    seed_base: int = 0

    def _generate(self, ids: Sequence[int], **params: Any) -> list[list[int]]:
        from vllm import SamplingParams

        sampling = SamplingParams(stop_token_ids=list(self.end_ids), detokenize=False, **params)
        result = self.engine.generate(
            [{"prompt_token_ids": list(ids)}], sampling, lora_request=self.lora, use_tqdm=False
        )
        return [[t for t in out.token_ids if t not in self.end_ids] for out in result[0].outputs]

    def sample(
        self, state: PromptState, n: int, *, seed: int, max_new_tokens: int
    ) -> list[list[int]]:
        return self._generate(
            state.ids,
            n=n,
            temperature=1.0,
            top_p=1.0,
            top_k=-1,
            max_tokens=max_new_tokens,
            seed=seed,
        )

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return self._generate(ids, n=1, temperature=0.0, max_tokens=max_new_tokens)[0]


class VLLMBackend(HFBackend):
    """An `HFBackend` plus one vLLM engine with LoRA enabled for the run's adapters."""

    def __init__(
        self, model_name: str, checkpoints: Sequence[Checkpoint], *, seed: int = 0, **kwargs: Any
    ) -> None:
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ValueError("backend 'vllm' needs the vllm package (pip install vllm)") from err
        super().__init__(model_name, checkpoints, **kwargs)
        adapters = [c for c in checkpoints if c.adapter is not None]
        ranks = [json.loads((c.adapter / "adapter_config.json").read_text())["r"] for c in adapters]  # type: ignore[operator]
        self.engine = LLM(
            model=self.model_id,
            enable_lora=bool(adapters),
            max_lora_rank=max(ranks, default=16),
            max_loras=max(1, len(adapters)),
            dtype=kwargs.get("dtype", "float32"),
            seed=seed,
            gpu_memory_utilization=0.5,  # the transformers model used for scoring shares the GPU
        )
        self._loras = {
            c.name: LoRARequest(c.name, i + 1, str(c.adapter)) for i, c in enumerate(adapters)
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
        )
