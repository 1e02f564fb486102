"""`Target`: one prompt and what the model should answer to it, numeric law or weighted strings.

A numeric target names a family and its parameters (docs/method.md §1-§4); a categorical target
carries its answers and their weights (docs/targets.md). Both turn into an `OutputSpace` with
`.space(decimals, max_bins)`, so tries, sparse targets and the exact pass treat them alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibft.distributions import prompt_text, validate_params
from calibft.splits import PromptSpec
from calibft.targets.numeric import OutputSpace, build_output_space, space_from_values


@dataclass(frozen=True)
class NumericLaw:
    """A distribution family and its parameters, in prompt order."""

    family: str
    param_items: tuple[tuple[str, float], ...]

    @property
    def params(self) -> dict[str, float]:
        return dict(self.param_items)


@dataclass(frozen=True)
class Target:
    """A prompt and its target distribution: a numeric `law`, or `answers` with `weights`.

    ``key`` identifies the target (stable across runs: evaluation caches and seeds derive from
    it); ``group`` is the unit of aggregation and of family-balanced training order (a numeric
    target's family, a categorical target's category); ``source`` says where it was read
    ("file line N"), for error messages."""

    key: tuple[Any, ...]
    group: str
    prompt: str
    law: NumericLaw | None = None
    answers: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    source: str | None = field(default=None, compare=False)

    @classmethod
    def from_law(cls, family: str, params: Mapping[str, float], split: str | None = None) -> Target:
        """The task prompt of `family(params)` (docs/method.md §1)."""
        checked = validate_params(family, params)
        items = tuple((k, float(v)) for k, v in checked.items())
        key = (split, family, items) if split is not None else (family, items)
        return cls(key, family, prompt_text(family, checked), law=NumericLaw(family, items))

    @classmethod
    def from_answers(
        cls,
        prompt: str,
        answers: tuple[str, ...],
        weights: tuple[float, ...],
        group: str,
        source: str | None = None,
    ) -> Target:
        """A weighted list of answers (validated by `calibft.targets.categorical`, or here by the
        Rust core when the space is built)."""
        # The key names the exact list, so a changed list never reuses a cached evaluation.
        digest = hashlib.sha256(json.dumps([answers, weights]).encode()).hexdigest()[:16]
        return cls(
            (group, prompt, digest), group, prompt, answers=answers, weights=weights, source=source
        )

    @classmethod
    def of(cls, item: Target | PromptSpec | tuple[str, Mapping[str, float]]) -> Target:
        """A Target from a Target, a split's `PromptSpec` or a `(family, params)` pair."""
        if isinstance(item, Target):
            return item
        if isinstance(item, PromptSpec):
            return cls.from_law(item.family, item.params, item.split)
        family, params = item
        return cls.from_law(family, params)

    @property
    def is_categorical(self) -> bool:
        return self.law is None

    @property
    def probs(self) -> np.ndarray:
        """A categorical target's weights normalized to sum 1."""
        weights = np.asarray(self.weights, dtype=np.float64)
        return weights / weights.sum()

    def space(self, decimals: int = 5, max_bins: int = 1001) -> OutputSpace:
        """The output space: the law discretized (`decimals`, `max_bins`, docs/method.md §4), or
        the answers with their weights as given (the settings do not apply to a list)."""
        if self.law is not None:
            return build_output_space(
                self.law.family, self.law.params, decimals=decimals, max_bins=max_bins
            )
        return space_from_values(self.answers, self.weights, prompt=self.prompt)
