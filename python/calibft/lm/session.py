"""The model backend every benchmark uses: the `LM` protocol and its transformers implementation.

A backend loads the base model once for a run; `session(checkpoint)` gives the `LM` of the base
model or of one LoRA adapter on it (adapters share the base weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from calibft.chat import ChatFormat
from calibft.lm.adapters import Checkpoint, attach_adapter, check_adapter_matches
from calibft.lm.batch import generate_many
from calibft.lm.decode import PromptState, lm_head_logits, prefill
from calibft.lm.layout import DEFAULT_CHUNK_SIZE, TrieLayout
from calibft.lm.load import load_model_and_tokenizer
from calibft.lm.sample import greedy_completion, sample_completions
from calibft.lm.score import (
    continuation_logprobs,
    document_nlls,
    request_logprobs,
    rolling_nll,
)
from calibft.lm.tree import edge_logprobs, path_logit_kl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def placement(device: str | None, dtype: str, local_rank: int | None = None) -> tuple[str, str]:
    """The (device, dtype) a model loads with. Device "auto" (or None): ``cuda:LOCAL_RANK`` for a
    rank of a sharded run (`local_rank` set), else "auto" (``device_map="auto"``: the model over
    every visible GPU) when CUDA is there, else "cpu". Dtype "auto": bfloat16 on CUDA, float32
    elsewhere."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            device = "cpu"
        else:
            device = "auto" if local_rank is None else f"cuda:{local_rank}"
    if dtype == "auto":
        dtype = "float32" if device_type(device) == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return device, dtype


def device_type(device: str) -> str:
    """The kind of device a placement computes on ("cuda" for device_map "auto"): part of every
    cache key, so records computed on one kind are never reused on another."""
    return "cuda" if device == "auto" else torch.device(device).type


class LM(Protocol):
    """What a benchmark may ask of a loaded checkpoint (docs/adding-a-benchmark.md §3).

    Text goes in through `chat` (the prompt as the model's template renders it) and `encode`;
    answers come out through `decode`. The transformers model and tokenizer behind a session are
    not part of the protocol, so a backend that is not transformers can serve every benchmark.
    """

    chat: ChatFormat
    end_ids: list[int]

    @property
    def bos_id(self) -> int | None:
        """The tokenizer's beginning-of-sequence token, None when it has none."""
        ...

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (max_position_embeddings), None if unstated."""
        ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as it stands: no special token is added (a rendered chat template
        already carries its own)."""
        ...

    def decode(self, ids: Sequence[int], *, special: bool = True) -> str:
        """The text of `ids`; ``special=False`` drops special tokens (see docs/adding-a-benchmark.md
        §3 for which benchmarks read answers which way)."""
        ...

    def prefill(self, ids: Sequence[int]) -> PromptState: ...

    def next_token_logprobs(self, state: PromptState) -> torch.Tensor: ...

    def sample(
        self, state: PromptState, n: int, *, seed: int, max_new_tokens: int
    ) -> list[list[int]]: ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]: ...

    def greedy_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """`greedy` of every prompt, decoded together (a benchmark's `run_batch`)."""
        ...

    def sample_many(
        self,
        prompts: Sequence[Sequence[int]],
        counts: Sequence[int],
        seeds: Sequence[int],
        max_new_tokens: int,
    ) -> list[list[list[int]]]:
        """Per prompt, what ``sample(prefill(prompt), count, seed=seed, ...)`` gives, all prompts
        decoded together: a prompt's draws never depend on the others in the batch."""
        ...

    def loglikelihood(
        self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[float]: ...

    def loglikelihood_requests(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[float]: ...

    def rolling_nll(self, ids: Sequence[int], window: int, stride: int) -> tuple[float, int]: ...

    def document_nlls(
        self, documents: Sequence[Sequence[int]], window: int, stride: int, batch_tokens: int = 8192
    ) -> list[tuple[float, int]]: ...

    def trie_logprobs(
        self,
        state: PromptState,
        layout: TrieLayout,
        nodes: np.ndarray | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> np.ndarray:
        """log p(edge token | edge's prefix) after the prompt of every trie edge leaving `nodes`
        (None: every internal node), float64 [E], NaN on the others; one tree-attention pass."""
        ...

    def trie_logit_kl(
        self, state: PromptState, trie: Any, layout: TrieLayout, num_paths: int, seed: int
    ) -> float:
        """The logit-level KL against `trie`'s targets along `num_paths` sampled target paths
        (docs/benchmarks/structured.md §4)."""
        ...


@dataclass
class HFSession:
    """`LM` on a transformers model (the base model, or a PEFT model with one active adapter)."""

    model: Any
    tokenizer: Any
    chat: ChatFormat
    end_ids: list[int]
    sample_batch_size: int = 250
    progress: bool = False

    def prefill(self, ids: Sequence[int]) -> PromptState:
        return prefill(self.model, list(ids))

    @torch.inference_mode()
    def next_token_logprobs(self, state: PromptState) -> torch.Tensor:
        """log p(token | prompt) over the whole vocabulary, float32 [V]."""
        return torch.log_softmax(
            lm_head_logits(self.model, state.last_hidden[None]).float(), dim=-1
        )[0]

    def sample(
        self, state: PromptState, n: int, *, seed: int, max_new_tokens: int
    ) -> list[list[int]]:
        return sample_completions(
            self.model,
            state,
            n,
            seed=seed,
            end_ids=self.end_ids,
            max_new_tokens=max_new_tokens,
            batch_size=self.sample_batch_size,
            progress=self.progress,
        )

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return greedy_completion(
            self.model, self.prefill(ids), end_ids=self.end_ids, max_new_tokens=max_new_tokens
        )

    def greedy_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        out = generate_many(
            self.model,
            prompts,
            [1] * len(prompts),
            None,
            end_ids=self.end_ids,
            max_new_tokens=max_new_tokens,
            batch_size=self.sample_batch_size,
        )
        return [rows[0] for rows in out]

    def sample_many(
        self,
        prompts: Sequence[Sequence[int]],
        counts: Sequence[int],
        seeds: Sequence[int],
        max_new_tokens: int,
    ) -> list[list[list[int]]]:
        return generate_many(
            self.model,
            prompts,
            counts,
            seeds,
            end_ids=self.end_ids,
            max_new_tokens=max_new_tokens,
            batch_size=self.sample_batch_size,
        )

    def loglikelihood(
        self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        return continuation_logprobs(self.model, self.prefill(context_ids), continuations)

    def loglikelihood_requests(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[float]:
        """log p(continuation | context) of (context, continuation) pairs; contexts that share a
        prefix (few-shot prompts) run it once."""
        return request_logprobs(self.model, requests)

    def rolling_nll(self, ids: Sequence[int], window: int, stride: int) -> tuple[float, int]:
        return rolling_nll(self.model, ids, window=window, stride=stride)

    def document_nlls(
        self, documents: Sequence[Sequence[int]], window: int, stride: int, batch_tokens: int = 8192
    ) -> list[tuple[float, int]]:
        """`rolling_nll` of each document; windows of several documents share a forward pass of
        at most `batch_tokens` tokens."""
        return document_nlls(
            self.model, documents, window=window, stride=stride, batch_tokens=batch_tokens
        )

    @property
    def bos_id(self) -> int | None:
        bos = self.tokenizer.bos_token_id
        return None if bos is None else int(bos)

    @property
    def max_positions(self) -> int | None:
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return None if limit is None else int(limit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, special: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=not special))

    def trie_logprobs(
        self,
        state: PromptState,
        layout: TrieLayout,
        nodes: np.ndarray | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> np.ndarray:
        return edge_logprobs(self.model, state, layout, nodes, chunk_size=chunk_size)

    def trie_logit_kl(
        self, state: PromptState, trie: Any, layout: TrieLayout, num_paths: int, seed: int
    ) -> float:
        return path_logit_kl(self.model, state, trie, layout, num_paths, seed)


def end_token_ids(tokenizer: Any, chat: ChatFormat) -> list[int]:
    """Tokens that end an answer: the chat template's end of turn and the tokenizer's eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return sorted({chat.end_token_id, *eos})


class HFBackend:
    """The base model loaded once; sessions for it and for adapters on it."""

    def __init__(
        self,
        model_name: str,
        checkpoints: Sequence[Checkpoint],
        *,
        dtype: str = "auto",
        device: str | None = "auto",
        local_rank: int | None = None,
        sample_batch_size: int = 250,
        progress: bool = False,
    ) -> None:
        """`device`, `dtype`, `local_rank`: see `placement`."""
        device, dtype = placement(device, dtype, local_rank)
        self.device_type, self.dtype = device_type(device), dtype
        self.model, self.tokenizer = load_model_and_tokenizer(
            model_name, dtype=DTYPES[dtype], device=device
        )
        self.model.eval()
        names = {
            model_name,
            str(getattr(self.model, "name_or_path", "")),
            str(self.model.config._name_or_path),
        }
        for checkpoint in checkpoints:
            if checkpoint.adapter is not None:
                check_adapter_matches(self.model, checkpoint, names)
        self.model_id = str(self.model.config._name_or_path or model_name)
        self.chat = ChatFormat.from_tokenizer(self.tokenizer)
        self.end_ids = end_token_ids(self.tokenizer, self.chat)
        self._peft: Any = None
        self._sample_batch_size = sample_batch_size
        self._progress = progress

    def session(self, checkpoint: Checkpoint) -> HFSession:
        model = self.model
        if checkpoint.adapter is not None:
            self._peft = model = attach_adapter(self.model, self._peft, checkpoint)
        elif self._peft is not None:
            # PEFT put its layers into the base model's modules: switched off, they add nothing
            # (attach_adapter switches them on again).
            self._peft.base_model.disable_adapter_layers()
        return HFSession(
            model,
            self.tokenizer,
            self.chat,
            self.end_ids,
            sample_batch_size=self._sample_batch_size,
            progress=self._progress,
        )
