import dataclasses
import pickle
from collections import Counter

import numpy as np
import pytest

from calibft.distributions import families, prompt_text, validate_params
from calibft.splits import SPLIT_NAMES, PromptSpec, splits

TRAIN = {f.id for f in families("train")}
HELDOUT = {f.id for f in families("heldout_ood")}
# The paper's split sizes, full grid (docs/method.md §3).
FULL_GRID_SIZES = {"train": 1988, "test_unseen_params": 591, "test_ood_family": 92}


@pytest.fixture(scope="module")
def full():
    return splits("full_grid")


@pytest.fixture(scope="module")
def selected():
    return splits("paper_selected")


def test_full_grid_sizes(full):
    assert list(full) == list(SPLIT_NAMES)
    assert {k: len(v) for k, v in full.items()} == FULL_GRID_SIZES


def test_paper_selected_sizes(full, selected):
    assert {k: len(v) for k, v in selected.items()} == {
        "train": FULL_GRID_SIZES["train"],
        "test_unseen_params": sum(len(f.selected) for f in families("train")),
        "test_ood_family": sum(len(f.selected) for f in families("heldout_ood")),
    }
    assert selected["train"] == full["train"]
    assert Counter(s.family for s in selected["test_unseen_params"]) == dict.fromkeys(TRAIN, 1)
    assert Counter(s.family for s in selected["test_ood_family"]) == dict.fromkeys(HELDOUT, 3)


def test_per_family_counts(full):
    train = Counter(s.family for s in full["train"])
    assert set(train) == TRAIN and not TRAIN & HELDOUT
    assert TRAIN | HELDOUT == {f.id for f in families()}
    assert set(s.family for s in full["test_unseen_params"]) == TRAIN
    assert set(s.family for s in full["test_ood_family"]) == HELDOUT
    assert train["uniform"] == 121 and train["binomial"] == 44 and train["triangular"] == 125
    assert train["hypergeometric"] == 45 and train["exponential"] == 25
    ood = Counter(s.family for s in full["test_ood_family"])
    assert ood == {
        "bernoulli": 5,
        "poisson": 17,
        "weibull": 36,
        "maxwell": 9,
        "chi": 9,
        "truncnorm": 16,
    }


def test_specs_are_valid_and_consistent(full, selected):
    for split_map in (full, selected):
        for name, specs in split_map.items():
            for spec in specs:
                assert spec.split == name
                assert validate_params(spec.family, spec.params) == spec.params
                assert list(spec.params) == list(validate_params(spec.family, spec.params))
                assert spec.prompt == prompt_text(spec.family, spec.params)
    # No duplicated prompt inside a split.
    for specs in full.values():
        assert len({s.prompt for s in specs}) == len(specs)


def test_grid_order_and_spacing(full):
    gaussian = [s.params for s in full["train"] if s.family == "gaussian"]
    # First axis (mu) varies slowest; sigma is geometric spacing, bit for bit.
    assert [p["mu"] for p in gaussian[:11]] == [-2.0] * 11
    assert [p["sigma"] for p in gaussian[:11]] == np.geomspace(0.5, 2.0, 11).tolist()
    assert [p["mu"] for p in gaussian[::11]] == np.linspace(-2.0, 2.0, 11).tolist()
    poisson = [s.params["lambda"] for s in full["test_ood_family"] if s.family == "poisson"]
    assert poisson == np.geomspace(1.0, 12.0, 17).tolist()


def test_prompt_rendering_examples(full):
    prompts = [s.prompt for s in full["train"]]
    gaussian = next(s for s in full["train"] if s.family == "gaussian" and s.params["mu"] > 0.3)
    assert gaussian.params["mu"] == np.linspace(-2.0, 2.0, 11)[6]  # raw float64 kept in params
    assert gaussian.prompt == (
        "Generate exactly ONE random number from a Gaussian distribution with parameters "
        "mu=0.4, sigma=0.5. Output ONLY the number."
    )
    assert any("parameters n=10, p=0.35." in p for p in prompts)
    assert not any("0000000" in p for p in prompts)


def test_grid_transforms(full, selected):
    hyper = [s.params for s in full["train"] if s.family == "hypergeometric"]
    # Round half to even: K = round(30 * 0.35) = round(10.5) = 10.
    assert {"M": 30.0, "K": 10.0, "N": 5.0} in hyper
    assert all(p["K"] <= p["M"] and p["N"] <= p["M"] for p in hyper)
    uniform = next(s for s in selected["test_unseen_params"] if s.family == "uniform")
    assert uniform.params == {"a": 3.5, "b": 10.5}
    tri = next(s for s in selected["test_unseen_params"] if s.family == "triangular")
    assert tri.params == {"a": 2.5, "c": 6.0, "b": 9.5}
    hyper_sel = next(s for s in selected["test_unseen_params"] if s.family == "hypergeometric")
    assert hyper_sel.params == {"M": 100.0, "K": 50.0, "N": 20.0}
    assert all(s.params["n"].is_integer() for s in full["train"] if s.family == "binomial")
    tri_train = [s.params for s in full["train"] if s.family == "triangular"]
    assert len(tri_train) == 125 and tri_train[0] == {"a": -3.0, "c": -3.0 + 0.1, "b": -2.0}


def test_subsampling_when_grid_exceeds_max_specs(monkeypatch):
    import importlib

    # `calibft.splits` the attribute is the function re-exported by the package; the module
    # itself is in sys.modules.
    splits_module = importlib.import_module("calibft.splits")

    def seven_gaussians(family):
        if family.id != "gaussian":
            return family
        train = dataclasses.replace(family.grids["train"], max_specs=7)
        return dataclasses.replace(family, grids={**family.grids, "train": train})

    table = [seven_gaussians(f) for f in families()]
    monkeypatch.setattr(splits_module, "families", lambda: table)
    gaussian = [s.params for s in splits_module.splits()["train"] if s.family == "gaussian"]
    mus = np.linspace(-2.0, 2.0, 11)
    sigmas = np.geomspace(0.5, 2.0, 11)
    rows = [(m, s) for m in mus for s in sigmas]
    expected = [rows[i] for i in np.linspace(0, 120, 7, dtype=int)]
    assert [(p["mu"], p["sigma"]) for p in gaussian] == expected
    assert expected[0] == (-2.0, 0.5) and expected[-1] == (2.0, 2.0)


def test_bad_selection():
    with pytest.raises(ValueError, match="selection must be one of full_grid, paper_selected"):
        splits("paper")


def test_prompt_spec_hashable_and_params_is_a_dict(full):
    spec = full["train"][0]
    assert isinstance(spec.params, dict)
    spec.params["a"] = 99.0  # a fresh copy: the spec is unchanged
    assert spec.params["a"] == -5.0
    assert len(set(full["train"])) == len(full["train"])
    assert pickle.loads(pickle.dumps(spec)) == spec
    made = PromptSpec.from_params("gaussian", {"sigma": 1, "mu": 0}, "custom")
    assert made == PromptSpec("gaussian", {"mu": 0.0, "sigma": 1.0}, made.prompt, "custom")
    assert hash(made) == hash(PromptSpec("gaussian", {"mu": 0, "sigma": 1}, made.prompt, "custom"))
    with pytest.raises(ValueError, match="'sigma'"):
        PromptSpec.from_params("gaussian", {"mu": 0.0, "sigma": -1.0}, "custom")
