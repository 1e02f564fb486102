"""The two scoring models of NoveltyBench (docs/benchmarks/noveltybench.md §3, §4): the pairwise
similarity classifier and the reward model, loaded from a Hugging Face id or a local directory.

`check_classifier` / `check_reward_model` are cheap (config and tokenizer only) and run before any
generation, so a model that cannot be found stops the run at once with one line saying how to give
a local copy; the weights are loaded once per run by `SimilarityClassifier.load` /
`RewardModel.load`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# NoveltyBench pairs the classifier with DeBERTa-v3-large's tokenizer.
PAPER_CLASSIFIER_TOKENIZER = "microsoft/deberta-v3-large"

# Each response enters the classifier cut to this many tokens.
MAX_RESPONSE_TOKENS = 128

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spm.model")


@dataclass(frozen=True)
class Role:
    """Which scorer a name refers to, for messages: its description and its flag."""

    what: str
    flag: str


CLASSIFIER = Role("similarity classifier", "--classifier")
CLASSIFIER_TOKENIZER = Role("similarity classifier's tokenizer", "--classifier-tokenizer")
REWARD_MODEL = Role("reward model", "--reward-model")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:240]


def _failure(role: Role, name: str, reason: str) -> ValueError:
    return ValueError(
        f"noveltybench: cannot load the {role.what} {name!r} ({reason}); download it where the "
        f"Hugging Face hub is reachable (huggingface-cli download <id> --local-dir DIR) and pass "
        f"{role.flag} DIR"
    )


def locate(name: str, role: Role) -> str:
    """A local directory (resolved) or a Hugging Face id, decided without loading anything."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise _failure(role, name, "no such directory")
    return name


def _config(name: str, role: Role) -> Any:
    from transformers import AutoConfig

    location = locate(name, role)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as err:
        raise _failure(role, name, _first_line(err)) from err
    path = Path(location)
    if path.is_dir() and not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise _failure(role, name, "the directory has a config.json but no weights")
    return config


def _tokenizer(name: str, role: Role) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(locate(name, role))
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise _failure(role, name, _first_line(err)) from err


def classifier_tokenizer_name(classifier: str, tokenizer: str | None) -> str:
    """Where the classifier's tokenizer comes from: the given name, else the classifier's own
    directory when it holds a tokenizer, else DeBERTa-v3-large's (NoveltyBench's pairing)."""
    if tokenizer is not None:
        return tokenizer
    path = Path(classifier).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES):
        return classifier
    return PAPER_CLASSIFIER_TOKENIZER


def check_classifier(name: str, tokenizer_name: str) -> None:
    """Refuse (ValueError, one line) a classifier that cannot be found or is not a 2-label one."""
    config = _config(name, CLASSIFIER)
    if config.num_labels != 2:
        raise _failure(
            CLASSIFIER,
            name,
            f"it has {config.num_labels} labels; a same/different classifier has 2",
        )
    tokenizer = _tokenizer(tokenizer_name, CLASSIFIER_TOKENIZER)
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise _failure(CLASSIFIER_TOKENIZER, tokenizer_name, "it has no [CLS] or [SEP] token")


def check_reward_model(name: str) -> None:
    """Refuse (ValueError, one line) a reward model that cannot be found, is not a 1-label
    sequence classifier or has no chat template."""
    config = _config(name, REWARD_MODEL)
    if config.num_labels != 1:
        raise _failure(
            REWARD_MODEL, name, f"it has {config.num_labels} labels; a reward model has 1"
        )
    if not getattr(_tokenizer(name, REWARD_MODEL), "chat_template", None):
        raise _failure(REWARD_MODEL, name, "its tokenizer has no chat template")


def _load_classifier_model(name: str, role: Role, **kwargs: Any) -> Any:
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(locate(name, role), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _failure(role, name, _first_line(err)) from err
    return model.eval()


def pair_inputs(tokenizer: Any, anchor: str, others: Sequence[str]) -> dict[str, torch.Tensor]:
    """The classifier's batch for (anchor, other) pairs: ``[CLS] anchor [SEP] other [SEP]``, each
    response tokenized without special tokens and cut to its first 128 tokens; token type 0 up to
    the first [SEP], 1 after; right-padded with an attention mask."""
    first = tokenizer(anchor, add_special_tokens=False)["input_ids"][:MAX_RESPONSE_TOKENS]
    head = [tokenizer.cls_token_id, *first, tokenizer.sep_token_id]
    rows, types = [], []
    for other in others:
        second = tokenizer(other, add_special_tokens=False)["input_ids"][:MAX_RESPONSE_TOKENS]
        rows.append(head + second + [tokenizer.sep_token_id])
        types.append([0] * len(head) + [1] * (len(second) + 1))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "token_type_ids": torch.tensor([t + [0] * (width - len(t)) for t in types]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }


@dataclass
class SimilarityClassifier:
    """P(same) for pairs of responses (label 1 of a 2-label sequence classifier)."""

    model: Any
    tokenizer: Any

    @classmethod
    def load(
        cls, name: str, tokenizer_name: str, device: str | torch.device
    ) -> SimilarityClassifier:
        # float32, as the classifier was published and used.
        model = _load_classifier_model(name, CLASSIFIER, dtype=torch.float32).to(device)
        return cls(model, _tokenizer(tokenizer_name, CLASSIFIER_TOKENIZER))

    @torch.inference_mode()
    def same_probability(self, anchor: str, others: Sequence[str]) -> list[float]:
        """For each of `others`, the classifier's probability that it says the same as `anchor`."""
        if not others:
            return []
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in pair_inputs(self.tokenizer, anchor, others).items()}
        logits = self.model(**batch).logits.float()
        return torch.softmax(logits, dim=-1)[:, 1].tolist()


@dataclass
class RewardModel:
    """The raw reward of each (prompt, response) conversation: the model's single logit."""

    name: str
    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, name: str, device: str | torch.device, dtype: torch.dtype) -> RewardModel:
        # Eager attention keeps Gemma-2's attention-logit soft-capping exact (as the authors ran
        # it); device_map puts the weights straight onto the device ("auto": over the GPUs).
        model = _load_classifier_model(
            name, REWARD_MODEL, dtype=dtype, device_map=str(device), attn_implementation="eager"
        )
        tokenizer = _tokenizer(name, REWARD_MODEL)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # The model finds each row's last real token by the pad id: batches need one.
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(name, model, tokenizer)

    def inputs(self, prompt: str, responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """The batch of two-turn conversations (user: prompt, assistant: response) tokenized by the
        chat template itself, so the sequence has the template's BOS only (no second one)."""
        conversations = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            for response in responses
        ]
        return dict(
            self.tokenizer.apply_chat_template(
                conversations,
                tokenize=True,
                padding=True,
                truncation=True,
                return_tensors="pt",
                return_dict=True,
            )
        )

    @torch.inference_mode()
    def rewards(self, prompt: str, responses: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.inputs(prompt, responses).items()}
        return self.model(**batch).logits[:, 0].float().tolist()
