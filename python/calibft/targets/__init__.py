"""What the model should answer: output spaces (discretized laws) and their tokenized tries."""

from calibft.targets.numeric import (
    OutputSpace,
    build_output_space,
    build_output_spaces,
    space_from_values,
)
from calibft.targets.trie import (
    Trie,
    TrieTokenizer,
    build_spaces_and_tries,
    build_trie,
    build_trie_from_ids,
    build_tries,
)

__all__ = [
    "OutputSpace",
    "Trie",
    "TrieTokenizer",
    "build_output_space",
    "build_output_spaces",
    "build_spaces_and_tries",
    "build_trie",
    "build_trie_from_ids",
    "build_tries",
    "space_from_values",
]
