"""What the model should answer: targets (a prompt with a numeric law or weighted answers), their
output spaces and their tokenized tries."""

from calibft.targets.categorical import load_targets
from calibft.targets.numeric import (
    OutputSpace,
    build_output_space,
    build_output_spaces,
    space_from_values,
)
from calibft.targets.target import NumericLaw, Target
from calibft.targets.trie import (
    Trie,
    TrieTokenizer,
    build_spaces_and_tries,
    build_trie,
    build_trie_from_ids,
    build_tries,
)

__all__ = [
    "NumericLaw",
    "OutputSpace",
    "Target",
    "Trie",
    "TrieTokenizer",
    "build_output_space",
    "build_output_spaces",
    "build_spaces_and_tries",
    "build_trie",
    "build_trie_from_ids",
    "build_tries",
    "load_targets",
    "space_from_values",
]
