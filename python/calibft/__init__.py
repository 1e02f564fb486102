"""calibft: calibration fine-tuning of language models (Baldelli et al., 2026).

What is asked (the family registry, splits, output spaces, tries) loads without torch,
transformers or SciPy. The rest of the public API is imported on first use (PEP 562): W1 (SciPy
when called) and the model-side passes `exact_logprobs` / `logit_kl` (torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from calibft.chat import ChatFormat
from calibft.distributions import (
    families,
    frozen_law,
    get_family,
    prompt_text,
    support,
    validate_params,
)
from calibft.splits import PromptSpec, evenly_spaced, splits
from calibft.targets import (
    OutputSpace,
    Target,
    Trie,
    TrieTokenizer,
    build_output_space,
    build_output_spaces,
    build_spaces_and_tries,
    build_trie,
    build_trie_from_ids,
    build_tries,
    load_targets,
    space_from_values,
)

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from calibft.eval.metrics import discrete_w1, w1, w1_batch
    from calibft.lm.tree import exact_logprobs, logit_kl

__version__ = "0.1.0"

# Public name -> module holding it, imported when the name is first read.
_LAZY = {
    "discrete_w1": "calibft.eval.metrics",
    "w1": "calibft.eval.metrics",
    "w1_batch": "calibft.eval.metrics",
    "exact_logprobs": "calibft.lm.tree",
    "logit_kl": "calibft.lm.tree",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'calibft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later reads skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ChatFormat",
    "OutputSpace",
    "PromptSpec",
    "Target",
    "Trie",
    "TrieTokenizer",
    "build_output_space",
    "build_output_spaces",
    "build_spaces_and_tries",
    "build_trie",
    "build_trie_from_ids",
    "build_tries",
    "discrete_w1",
    "evenly_spaced",
    "exact_logprobs",
    "families",
    "frozen_law",
    "get_family",
    "load_targets",
    "logit_kl",
    "prompt_text",
    "space_from_values",
    "splits",
    "support",
    "validate_params",
    "w1",
    "w1_batch",
]
