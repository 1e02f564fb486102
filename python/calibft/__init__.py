"""calibft: calibration fine-tuning of language models (Baldelli et al., 2026)."""

from calibft.chat import ChatFormat
from calibft.distributions import (
    families,
    frozen_law,
    get_family,
    prompt_text,
    support,
    validate_params,
)
from calibft.eval.exact import exact_logprobs, logit_kl
from calibft.eval.metrics import discrete_w1, w1, w1_batch
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

__version__ = "0.1.0"

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
