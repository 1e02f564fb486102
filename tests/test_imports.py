"""Light imports: what is asked (registry, splits, spaces, tries, W1) and the CLI's `--version` and
`eval --list` load no torch, transformers or accelerate; the model-side API loads on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import calibft

HEAVY = {"torch", "transformers", "accelerate"}

USE_LIGHT_API = """
import numpy as np
import calibft
specs = calibft.splits("paper_selected")["test_ood_family"]
space = calibft.build_output_space(specs[0].family, specs[0].params, decimals=2, max_bins=50)
trie = calibft.build_trie_from_ids(
    np.array([0, 2, 3]), np.array([5, 7, 6]), np.array([0.25, 0.75])
)
calibft.w1(np.array([0.1, 0.5]), "gaussian", {"mu": 0.0, "sigma": 1.0})
calibft.get_family("poisson"), calibft.prompt_text("poisson", {"lambda": 2.0})
"""


def imported_packages(*args: str) -> set[str]:
    """Top-level packages a fresh `python -X importtime ARGS` imports (from its stderr report)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
    names = {row[-1].strip().split(".")[0] for row in rows[1:]}  # rows[0] is the header
    assert "calibft" in names  # the report was parsed
    return names


def test_import_calibft_loads_no_model_code_nor_scipy():
    assert imported_packages("-c", "import calibft") & (HEAVY | {"scipy"}) == set()


def test_registry_splits_spaces_tries_and_w1_load_no_model_code():
    names = imported_packages("-c", USE_LIGHT_API)
    assert "scipy" in names  # the laws are SciPy's
    assert names & HEAVY == set()


@pytest.mark.parametrize("args", [("--version",), ("eval", "--list")])
def test_cli_version_and_list_load_no_model_code(args):
    names = imported_packages("-m", "calibft", *args)
    assert names & HEAVY == set()
    if args == ("--version",):
        assert "scipy" not in names


def test_lazy_attributes_resolve_and_are_listed():
    from calibft.eval import metrics
    from calibft.lm import tree

    assert calibft.w1 is metrics.w1 and calibft.discrete_w1 is metrics.discrete_w1
    assert calibft.exact_logprobs is tree.exact_logprobs and calibft.logit_kl is tree.logit_kl
    assert all(hasattr(calibft, name) for name in calibft.__all__)
    assert set(calibft.__all__) <= set(dir(calibft))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        calibft.nonexistent  # noqa: B018
