"""Tokenized prefix tries and their sparse next-token targets (docs/method.md §5).

Tries are built in Rust: `Trie` exposes CSR arrays (`node_offsets`, `child_tokens`, `child_probs`,
`child_nodes`), `value_paths()`, seeded `sample_paths(n, seed)` and `targets_along(ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from calibft import _core
from calibft.chat import ChatFormat
from calibft.targets.numeric import OutputSpace, build_output_spaces
from calibft.targets.target import Target

Trie = _core.Trie

# Stands in for the prompt when a space has none; only its template tail matters.
_REFERENCE_PROMPT = "Generate exactly ONE random number."
# Values used to check that tail-only tokenization equals tokenizing the whole chat prefix.
_PROBE_VALUES = ("0", "7", "-1.50000", "123.45678", "1000", "-0.00010")
# How many of a string space's own values are checked the same way: numbers are covered by the
# probes above, but arbitrary strings (leading spaces, punctuation) may split differently.
_OWN_PROBES = 16


class TrieTokenizer:
    """A tokenizer prepared for building tries: the Rust tokenizer plus the chat conventions.

    Building one converts the tokenizer to Rust (about a second for a 151k vocabulary): build it
    once and pass it to `build_trie`/`build_tries` in loops.
    """

    def __init__(self, hf_tokenizer: Any, chat: ChatFormat) -> None:
        self.hf = hf_tokenizer
        self.chat = chat
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._core = (
            _core.CompletionTokenizer(backend.to_str(), chat.end_token_id) if backend else None
        )
        self._shared_context = self._prompt_independent_context()
        if self._core is not None:
            self._check_tail_tokenization()

    @classmethod
    def from_hf(cls, hf_tokenizer: Any, chat: ChatFormat | None = None) -> TrieTokenizer:
        if isinstance(hf_tokenizer, TrieTokenizer):
            return hf_tokenizer
        return cls(hf_tokenizer, chat or ChatFormat.from_tokenizer(hf_tokenizer))

    def context(self, prompt: str | None) -> str:
        if self._shared_context is not None:
            return self._shared_context
        return self.chat.completion_context(prompt or _REFERENCE_PROMPT)

    def _prompt_independent_context(self) -> str | None:
        """The context when the template puts a special token after the prompt (then the tail
        is the same for every prompt and rendering it once per prompt would be wasted work)."""
        probes = ("First probe prompt?", "Second, different probe.")
        tails = [self.chat.completion_context(p) for p in probes]
        independent = tails[0] == tails[1] and not any(p in t for p, t in zip(probes, tails))
        return tails[0] if independent else None

    def encode_values(
        self, values: Sequence[str], prompt: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64[n+1], ids int32) of each value's completion ids, end token included."""
        if self._core is not None:
            return self._core.encode_values(self.context(prompt), list(values))
        return self._encode_in_full(values, prompt or _REFERENCE_PROMPT)

    def _encode_in_full(self, values: Sequence[str], prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Reference path: tokenize `prefix + value` whole and strip the prefix's ids."""
        prefix = self.chat.render(prompt)
        prefix_ids = self.chat.prompt_ids(prompt)
        offsets, flat = [0], []
        for value in values:
            ids = list(self.hf(prefix + value, add_special_tokens=False)["input_ids"])
            if ids[: len(prefix_ids)] != prefix_ids:
                raise ValueError(
                    f"the chat prefix's last tokens merge with {value!r}: "
                    "completion tokens are ambiguous"
                )
            flat.extend(ids[len(prefix_ids) :] + [self.chat.end_token_id])
            offsets.append(len(flat))
        return np.asarray(offsets, dtype=np.int64), np.asarray(flat, dtype=np.int32)

    def check_prompt_prefix(self, prompt: str, prompt_ids: Sequence[int], path: np.ndarray) -> None:
        """The templated prompt's ids must be a prefix of the ids of prompt + completion (`path`,
        end token last): otherwise training would use token boundaries that generation never
        sees."""
        value = self.hf.decode(path[:-1].tolist())
        full = list(
            self.hf(self.chat.render(prompt) + value, add_special_tokens=False)["input_ids"]
        )
        if full != list(prompt_ids) + path[:-1].tolist():
            raise ValueError(
                f"tokenizing the chat-templated prompt followed by {value!r} "
                "does not give the prompt's "
                "ids followed by the completion's: the chat template's end merges with the answer"
            )

    def _check_tail_tokenization(
        self, values: Sequence[str] = _PROBE_VALUES, prompt: str | None = None
    ) -> None:
        values = list(values)
        fast = self.encode_values(values, prompt)
        full = self._encode_in_full(values, prompt or _REFERENCE_PROMPT)
        if not (np.array_equal(fast[0], full[0]) and np.array_equal(fast[1], full[1])):
            raise ValueError(
                "this tokenizer tokenizes answers differently after the full chat prefix "
                "than after "
                "its last special token; calibft cannot build exact tries for it"
            )

    def check_own_strings(self, space: OutputSpace) -> None:
        """For a space of arbitrary strings, the tail-tokenization check on its own first values
        (numeric spaces are covered by the probe numbers checked when the tokenizer was built)."""
        if self._core is not None and not space.is_numeric:
            self._check_tail_tokenization(space.values[:_OWN_PROBES], space.prompt)


def build_trie(space: OutputSpace, tokenizer: Any) -> Trie:
    """The prefix trie of `space`'s completions under `tokenizer` (HF tokenizer or
    TrieTokenizer)."""
    tok = TrieTokenizer.from_hf(tokenizer)
    if tok._core is not None:
        tok.check_own_strings(space)
        return _core.build_trie(space.core, tok._core, tok.context(space.prompt))
    offsets, ids = tok.encode_values(space.values, space.prompt)
    return _core.build_trie_from_ids(offsets, ids, space.probs)


def build_tries(spaces: Sequence[OutputSpace], tokenizer: Any) -> list[Trie]:
    """Tries for many spaces, tokenized and built in parallel in Rust."""
    tok = TrieTokenizer.from_hf(tokenizer)
    if tok._core is None:
        return [build_trie(s, tok) for s in spaces]
    for space in spaces:
        tok.check_own_strings(space)
    contexts = [tok.context(s.prompt) for s in spaces]
    return _core.build_tries([s.core for s in spaces], tok._core, contexts)


def build_trie_from_ids(offsets: np.ndarray, ids: np.ndarray, masses: np.ndarray) -> Trie:
    """A trie from pre-tokenized completions (terminator included), for any tokenizer."""
    return _core.build_trie_from_ids(
        np.ascontiguousarray(offsets, dtype=np.int64),
        np.ascontiguousarray(ids, dtype=np.int32),
        np.ascontiguousarray(masses, dtype=np.float64),
    )


def _spaces(items: Sequence[Any], decimals: int, max_bins: int) -> list[OutputSpace]:
    """Output spaces of Targets, prompt specs or `(family, params)` pairs."""
    return [
        item.space(decimals=decimals, max_bins=max_bins)
        if isinstance(item, Target)
        else build_output_spaces([item], decimals=decimals, max_bins=max_bins)[0]
        for item in items
    ]


def build_spaces_and_tries(
    specs: Sequence[Any],
    tokenizer: Any,
    *,
    decimals: int = 5,
    max_bins: int = 1001,
    chunk_size: int = 64,
    keep_spaces: bool = True,
    progress: bool = False,
) -> tuple[list[OutputSpace], list[Trie]]:
    """Output spaces and tries for many targets (`Target`s, prompt specs or `(family, params)`
    pairs), pipelined: while Python asks SciPy for the next chunk's CDFs, Rust tokenizes and
    builds the previous chunk's tries without the GIL.

    `keep_spaces=False` returns no spaces (each chunk's are freed once its tries exist): tries
    alone carry everything training needs, at about half the memory for large `max_bins`."""
    tok = TrieTokenizer.from_hf(tokenizer)
    spaces: list[OutputSpace] = []
    pending = []
    bar = tqdm(total=len(specs), desc="targets", unit="prompt", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for start in range(0, len(specs), chunk_size):
            chunk = _spaces(specs[start : start + chunk_size], decimals, max_bins)
            if keep_spaces:
                spaces.extend(chunk)
            pending.append(pool.submit(build_tries, chunk, tok))
            bar.update(len(chunk))
        tries = [trie for future in pending for trie in future.result()]
    bar.close()
    return spaces, tries
