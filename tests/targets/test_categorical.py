"""Categorical targets (docs/targets.md): loading and validating target files, `Target`, string
output spaces and their tries, and training on categorical targets alone or mixed with a numeric
family (tiny local model)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import tiny_tokenizer
from transformers import PreTrainedTokenizerFast

import calibft
import calibft.train.loop as loop
from calibft.config import build
from calibft.lm.load import load_tokenizer
from calibft.splits import splits
from calibft.targets import Target, TrieTokenizer, build_output_space, build_trie, space_from_values
from calibft.targets.categorical import check_answers, load_target_files, load_targets
from calibft.targets.trie import _REFERENCE_PROMPT
from calibft.train.config import TrainConfig, load_config
from calibft.train.data import DataPlan, prepare_targets, select_prompts, select_targets
from calibft.train.loop import train

COIN = {"prompt": "Flip a coin. Reply with Heads or Tails.", "targets": ["Heads", "Tails"]}
DIE = {
    "prompt": "Roll a die.",
    "targets": ["1", "2", "3", "4", "5", "6"],
    "weights": [1, 1, 1, 1, 1, 5],
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---- loading -----------------------------------------------------------------------------------


def test_jsonl_records_become_targets(tmp_path):
    path = write_jsonl(tmp_path / "games.jsonl", [COIN, "", {**DIE, "group": "dice"}])
    coin, die = load_targets(path)
    assert (coin.prompt, coin.answers, coin.weights, coin.group) == (
        COIN["prompt"],
        ("Heads", "Tails"),
        (1.0, 1.0),
        "games",
    )
    assert die.group == "dice" and die.weights == (1.0,) * 5 + (5.0,)
    np.testing.assert_allclose(die.probs, [0.1] * 5 + [0.5])
    assert (
        coin.source == f"{path} line 1" and die.source == f"{path} line 3"
    )  # the blank line counts
    assert coin.is_categorical and coin.law is None
    assert calibft.load_targets is load_targets and calibft.Target is Target


def test_peer_format_loads_as_it_is(tmp_path):
    """Zhang et al. (2024) files: one pretty-printed JSON object with request, response, targets."""
    path = tmp_path / "rng-0.json"
    path.write_text(
        json.dumps(
            {"request": "Pick 1 to 3.", "response": [""], "targets": ["{1}", "{2}", "{3}"]},
            indent=2,
        )
    )
    (target,) = load_targets(path)
    assert (
        target.prompt == "Pick 1 to 3."
        and target.answers == ("{1}", "{2}", "{3}")
        and target.group == "rng-0"
    )


def test_json_lists_and_yaml_give_record_lines(tmp_path):
    records = [COIN, DIE]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records, indent=2))
    assert [t.answers for t in load_targets(listed)] == [tuple(r["targets"]) for r in records]
    starts = [
        str(n)
        for n, line in enumerate(listed.read_text().splitlines(), 1)
        if line.startswith("  {")
    ]
    assert [t.source.rsplit(" ", 1)[1] for t in load_targets(listed)] == starts
    as_yaml = tmp_path / "set.yaml"
    as_yaml.write_text(yaml.safe_dump(records, sort_keys=False))
    from_yaml = load_targets(as_yaml)
    assert [(t.prompt, t.answers) for t in from_yaml] == [
        (t.prompt, t.answers) for t in load_targets(listed)
    ]
    lines = as_yaml.read_text().splitlines()
    for target in from_yaml:
        line = int(target.source.rsplit(" ", 1)[1])
        assert lines[line - 1].startswith("- ")  # each record's first line
    one = tmp_path / "one.yml"
    one.write_text(yaml.safe_dump(COIN))
    assert load_targets(one)[0].answers == ("Heads", "Tails")


def test_the_key_changes_with_the_list_and_not_with_the_file(tmp_path):
    a = load_targets(write_jsonl(tmp_path / "a.jsonl", [{**COIN, "group": "g"}]))[0]
    b = load_targets(write_jsonl(tmp_path / "b.jsonl", [{**COIN, "group": "g"}]))[0]
    c = load_targets(
        write_jsonl(tmp_path / "c.jsonl", [{**COIN, "group": "g", "weights": [2, 1]}])
    )[0]
    assert a.key == b.key and a == b  # the source is not part of a target's identity
    assert c.key != a.key
    json.dumps(a.key)  # keys name cache files and seed evaluations


def test_shipped_sets_split_categories_and_wordings():
    train_set, heldout = load_targets("shipped:train"), load_targets("shipped:heldout")
    assert {t.group for t in train_set}.isdisjoint({t.group for t in heldout})
    assert {t.prompt for t in train_set}.isdisjoint({t.prompt for t in heldout})
    for chosen in (train_set, heldout):
        sizes = [len(t.answers) for t in chosen]
        assert min(sizes) == 2 and max(sizes) >= 24
        assert any(len(set(t.weights)) > 1 for t in chosen) and any(
            len(set(t.weights)) == 1 for t in chosen
        )
        assert any(" " in a for t in chosen for a in t.answers)  # multi-word answers
    assert max(len(t.answers) for t in train_set) == 50


BAD = [
    ("{not json", "line 1: not valid JSON"),
    ('["a", "b"]', "line 1: a record must be an object"),
    ({"targets": ["a", "b"]}, "line 1: prompt: must be a non-empty string, got null"),
    ({"prompt": "  ", "targets": ["a"]}, "line 1: prompt: must be a non-empty string"),
    (
        {"prompt": "p", "request": "q", "targets": ["a"]},
        "line 1: prompt: give either prompt or request",
    ),
    ({"request": 3, "targets": ["a"]}, "line 1: request: must be a non-empty string, got 3"),
    ({"prompt": "p"}, "line 1: targets: must be a non-empty list"),
    ({"prompt": "p", "targets": []}, "line 1: targets: must be a non-empty list"),
    ({"prompt": "p", "targets": "a"}, "line 1: targets: must be a non-empty list"),
    (
        {"prompt": "p", "targets": ["a", 7]},
        "line 1: targets: answer 2 is 7, not a string; quote it",
    ),
    ({"prompt": "p", "targets": ["a", ""]}, "line 1: targets: answer 2 is empty"),
    ({"prompt": "p", "targets": ["a", "   "]}, "line 1: targets: answer 2 is empty"),
    (
        {"prompt": "p", "targets": ["a", "b", "a"]},
        "line 1: targets: 'a' appears twice (answers 1 and 3)",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": [1]},
        "line 1: weights: 1 weights for 2 answers",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": [1, 2, 3]},
        "line 1: weights: 3 weights for 2 answers",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": [1, -0.5]},
        "line 1: weights: weight 2 is negative (-0.5)",
    ),
    (
        '{"prompt": "p", "targets": ["a", "b"], "weights": [1, NaN]}',
        "line 1: weights: weight 2 is nan, not a finite",
    ),
    (
        '{"prompt": "p", "targets": ["a", "b"], "weights": [Infinity, 1]}',
        "line 1: weights: weight 1 is inf",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": [0, 0.0]},
        "line 1: weights: all weights are zero",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": [True, 1]},
        "line 1: weights: weight 1 is true, not a number",
    ),
    (
        {"prompt": "p", "targets": ["a", "b"], "weights": "1,1"},
        "line 1: weights: must be a list of numbers",
    ),
    ({"prompt": "p", "targets": ["a"], "weight": [1]}, "line 1: weight: unknown field"),
    ({"prompt": "p", "targets": ["a"], "group": ""}, "line 1: group: must be a non-empty string"),
    (
        {"request": "p", "targets": ["a"], "response": ["Sure: "]},
        "line 1: response: answer prefixes are not supported",
    ),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [COIN, record])
    with pytest.raises(ValueError, match=re.escape(message.replace("line 1", "line 2"))) as err:
        load_targets(path)
    assert str(err.value).startswith(f"{path} line 2: ") and "\n" not in str(err.value)


def test_file_level_mistakes(tmp_path):
    with pytest.raises(ValueError, match="nowhere.jsonl: no such file"):
        load_targets(tmp_path / "nowhere.jsonl")
    (tmp_path / "set.csv").write_text("a,b\n")
    with pytest.raises(
        ValueError, match=r"set.csv: target files must end in .jsonl, .json, .yaml, .yml"
    ):
        load_targets(tmp_path / "set.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: holds no targets"):
        load_targets(tmp_path / "empty.jsonl")
    with pytest.raises(
        ValueError,
        match="unknown shipped set 'shipped:test'; choose shipped:train, shipped:heldout",
    ):
        load_targets("shipped:test")
    path = write_jsonl(tmp_path / "twice.jsonl", [COIN, DIE, {**COIN, "targets": ["H", "T"]}])
    with pytest.raises(
        ValueError,
        match=r"twice.jsonl line 3: prompt: the same prompt and group as .*twice.jsonl line 1",
    ):
        load_targets(path)
    # The same prompt in another group is another target; across files the rule still holds.
    write_jsonl(tmp_path / "other.jsonl", [{**COIN, "group": "twice"}])
    with pytest.raises(
        ValueError,
        match=r"other.jsonl line 1: prompt: the same prompt and group as .*ok.jsonl line 1",
    ):
        load_target_files(
            [
                write_jsonl(tmp_path / "ok.jsonl", [{**COIN, "group": "twice"}]),
                tmp_path / "other.jsonl",
            ]
        )


def test_yaml_and_json_mistakes_name_their_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- prompt: p\n  targets: [a, b]\n- prompt: q\n  targets: [a, a]\n")
    with pytest.raises(ValueError, match=r"bad.yaml line 3: targets: 'a' appears twice"):
        load_targets(bad_yaml)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("- prompt: p\n  targets: [a, b\n")
    with pytest.raises(ValueError, match=r"broken.yaml line \d+: not valid YAML"):
        load_targets(broken_yaml)
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("- prompt: p\n  targets: [1, 2]\n")
    with pytest.raises(
        ValueError, match="numbers.yaml line 1: targets: answer 1 is 1, not a string; quote it"
    ):
        load_targets(numbers)
    bad_json = tmp_path / "bad.json"
    second = '{"prompt": "q", "targets": ["a"], "weights": [-1]}'
    bad_json.write_text(f'[\n  {{"prompt": "p", "targets": ["a"]}},\n  {second}\n]')
    with pytest.raises(ValueError, match=r"bad.json line 3: weights: weight 1 is negative"):
        load_targets(bad_json)
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[\n  {"prompt": "p", "targets": ["a"]}\n  {"prompt": "q"}\n]')
    with pytest.raises(ValueError, match=r"truncated.json line 3: not valid JSON"):
        load_targets(truncated)


def test_tokenizer_checks(tokenizer, tmp_path):
    end = "<|im_end|>"
    path = write_jsonl(
        tmp_path / "t.jsonl", [COIN, {"prompt": "Say yes.", "targets": ["Yes", f"Yes{end}No"]}]
    )
    expected = (
        f"t.jsonl line 2: targets: answer 'Yes{end}No' contains the end-of-turn token '{end}'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        check_answers(load_targets(path), tokenizer)
    assert "\n" not in str(err.value)
    long_prompt = {"prompt": "Flip a coin " * 40, "targets": ["Heads", "Tails"]}
    path = write_jsonl(tmp_path / "long.jsonl", [COIN, long_prompt])
    targets = load_targets(path)
    check_answers(targets, tokenizer)  # no limit given: nothing to check
    with pytest.raises(
        ValueError,
        match=r"long.jsonl line 2: prompt: \d+ prompt tokens and a longest answer of \d+ exceed "
        "max_seq_len=64",
    ):
        check_answers(targets, tokenizer, max_seq_len=64)
    chat_len = len(TrieTokenizer.from_hf(tokenizer).chat.prompt_ids(COIN["prompt"]))
    answer_len = max(
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in COIN["targets"]
    )
    check_answers(targets[:1], tokenizer, max_seq_len=chat_len + answer_len)  # exactly fits
    with pytest.raises(ValueError, match="max_seq_len"):
        check_answers(targets[:1], tokenizer, max_seq_len=chat_len + answer_len - 1)


def test_answers_that_tokenize_alike_are_rejected(tmp_path):
    from tokenizers import normalizers

    tokenizer = tiny_tokenizer()
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Lowercase()
    lowering = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", chat_template=tokenizer.chat_template
    )
    path = write_jsonl(tmp_path / "case.jsonl", [{"prompt": "p", "targets": ["Yes", "No", "yes"]}])
    with pytest.raises(
        ValueError, match=r"case.jsonl line 1: targets: 'Yes' and 'yes' are the same tokens"
    ):
        check_answers(load_targets(path), lowering)


# ---- Target, string spaces and their tries -----------------------------------------------------


def test_numeric_targets_are_targets_too():
    spec = splits("paper_selected")["test_ood_family"][0]
    target = Target.of(spec)
    assert (target.group, target.prompt, target.law.family, target.law.params) == (
        spec.family,
        spec.prompt,
        spec.family,
        spec.params,
    )
    assert target.key == (spec.split, spec.family, spec.param_items) and not target.is_categorical
    space = target.space(decimals=2, max_bins=50)
    expected = build_output_space(spec.family, spec.params, decimals=2, max_bins=50)
    assert space.values == expected.values and space.prompt == spec.prompt and space.is_numeric
    assert Target.of(("gaussian", {"mu": 0, "sigma": 1})).key == (
        "gaussian",
        (("mu", 0.0), ("sigma", 1.0)),
    )


def test_string_spaces_have_no_numbers_and_no_bounds():
    space = space_from_values(["Paris", "12", "-3"], [2, 1, 1], prompt="Name a city.")
    assert space.values == ["Paris", "12", "-3"] and not space.is_numeric and not space.integer
    np.testing.assert_allclose(space.probs, [0.5, 0.25, 0.25])
    assert (space.lower, space.upper, space.decimals, space.family) == (None, None, None, None)
    with pytest.raises(ValueError, match="arbitrary strings"):
        space.numeric  # noqa: B018
    for values, masses, field in [
        (["a", "a"], [1, 1], "values"),
        (["a", ""], [1, 1], "values"),
        (["a"], [-1], "masses"),
        (["a", "b"], [0, 0], "masses"),
        (["a", "b"], [1, math.nan], "masses"),
        (["a", "b"], [1], "masses"),
    ]:
        with pytest.raises(ValueError, match=f"invalid {field}"):
            space_from_values(values, masses)


def _hf_completion_ids(tok: TrieTokenizer, answers, prompt: str) -> list[list[int]]:
    """The oracle: ids of `chat prefix + answer + end token` after the prefix's ids."""
    prefix, prefix_ids = tok.chat.render(prompt), tok.chat.prompt_ids(prompt)
    out = []
    for answer in answers:
        ids = tok.hf(prefix + answer + tok.chat.end_token, add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix_ids)] == prefix_ids
        out.append(ids[len(prefix_ids) :])
    return out


@pytest.mark.parametrize(
    "record",
    [
        COIN,
        DIE,
        {
            "prompt": "Pick a state.",
            "targets": ["New York", "New Jersey", "Ohio", "New Mexico"],
            "weights": [4, 3, 2, 1],
        },
    ],
)
def test_trie_paths_enumerate_exactly_the_answers_with_their_weights(tokenizer, tmp_path, record):
    (target,) = load_targets(write_jsonl(tmp_path / "t.jsonl", [record]))
    tok = TrieTokenizer.from_hf(tokenizer)
    trie = build_trie(target.space(), tok)
    offsets, ids = trie.value_paths()
    paths = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    # Tokenized in context after the target's own chat prefix, end-of-turn token last.
    assert paths == _hf_completion_ids(tok, target.answers, target.prompt)
    assert [tokenizer.decode(p[:-1]) for p in paths] == list(target.answers)
    np.testing.assert_allclose(trie.value_probs, target.probs, rtol=1e-12)
    # The product of the next-token targets along each path gives the answer's weight back.
    for path, weight in zip(paths, target.probs):
        t_off, t_tok, t_prob = trie.targets_along(np.asarray(path, dtype=np.int32))
        product = 1.0
        for k, token in enumerate(path):
            row = slice(t_off[k], t_off[k + 1])
            product *= t_prob[row][list(t_tok[row]).index(token)]
            assert t_prob[row].sum() == pytest.approx(1.0)
        assert product == pytest.approx(weight, rel=1e-12)
    # Sampled paths follow the weights.
    drawn, _, _ = trie.sample_paths(20000, 7)
    np.testing.assert_allclose(
        np.bincount(drawn, minlength=len(paths)) / 20000, target.probs, atol=0.015
    )


def test_tail_probe_uses_the_targets_own_strings(tokenizer, monkeypatch):
    tok = TrieTokenizer.from_hf(tokenizer)
    seen = []
    original = TrieTokenizer._encode_in_full
    monkeypatch.setattr(
        TrieTokenizer,
        "_encode_in_full",
        lambda self, values, prompt: (
            seen.append((list(values), prompt)) or original(self, values, prompt)
        ),
    )
    build_trie(space_from_values(["Heads", "Tails"], [1, 1], prompt="Flip."), tok)
    build_trie(space_from_values(["Heads", "Tails"], [1, 1]), tok)
    build_trie(
        build_output_space("poisson", {"lambda": 2.0}, max_bins=20), tok
    )  # numbers: probed at start
    assert seen == [(["Heads", "Tails"], "Flip."), (["Heads", "Tails"], _REFERENCE_PROMPT)]


# ---- training ----------------------------------------------------------------------------------


def tiny_train_config(model_dir: Path, output: Path, targets: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        output=str(output),
        targets=[str(targets)],
        epochs=2,
        batch_size=2,
        lora_r=4,
        lora_alpha=8,
        lr=1e-2,
        checkpoint_every=0,
        max_seq_len=128,
    )
    return build(TrainConfig, {**values, **overrides})


@pytest.fixture
def target_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "games.jsonl",
        [COIN, {**DIE, "group": "dice"}, {**COIN, "prompt": "Toss a coin."}],
    )


def test_selection_alone_mixed_and_with_all_families(model_dir, tmp_path, target_file):
    alone = select_targets(tiny_train_config(model_dir, tmp_path, target_file))
    assert [t.group for t in alone] == ["games", "games", "dice"] and all(
        t.is_categorical for t in alone
    )
    mixed = select_targets(
        tiny_train_config(
            model_dir, tmp_path, target_file, families="gaussian", prompts_per_family=1
        )
    )
    assert [t.group for t in mixed] == ["gaussian", "games", "dice"]  # one per family and per group
    everything = select_targets(
        tiny_train_config(model_dir, tmp_path, target_file, families="all", prompts_per_family=1)
    )
    train_families = len(calibft.families("train"))
    assert (
        len({t.group for t in everything if not t.is_categorical}) == train_families
        and len(everything) == train_families + 2
    )
    # Without targets nothing changes: every training family.
    assert len(select_prompts(build(TrainConfig, {"prompts_per_family": 1}))) == train_families
    with pytest.raises(ValueError, match="nonsense not training families; choose from .* or all"):
        select_targets(tiny_train_config(model_dir, tmp_path, target_file, families="nonsense"))


def test_groups_are_balanced_like_families(model_dir, tmp_path, target_file):
    config = tiny_train_config(
        model_dir, tmp_path, target_file, families="gaussian", prompts_per_family=2, repeats=2
    )
    targets = select_targets(config)
    plan = DataPlan.for_run(config, targets, 0, 1)
    assert plan.families == ["gaussian"] * 4 + ["games"] * 4 + ["dice"] * 2
    order = plan.local_examples(0)
    # Round robin: the first three examples come from three different groups.
    assert {plan.families[i] for i in order[:3]} == {"gaussian", "games", "dice"}


def test_prepared_tries_of_mixed_targets(model_dir, tmp_path, target_file, tokenizer):
    config = tiny_train_config(
        model_dir,
        tmp_path,
        target_file,
        families="gaussian",
        prompts_per_family=1,
        decimals=1,
        max_bins=16,
    )
    targets = select_targets(config)
    hf = load_tokenizer(str(model_dir))
    prompt_ids, tries = prepare_targets(config, hf, targets, False)
    tok = TrieTokenizer.from_hf(hf)
    assert tries[0].num_values <= 16
    for target, ids, trie in zip(targets[1:], prompt_ids[1:], tries[1:]):
        assert ids == tok.chat.prompt_ids(target.prompt)
        offsets, flat = trie.value_paths()
        assert [
            hf.decode(flat[a : b - 1].tolist()) for a, b in zip(offsets[:-1], offsets[1:])
        ] == list(target.answers)


def test_bad_target_files_fail_before_weights_load(model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error was raised")

    monkeypatch.setattr(loop, "load_model_and_tokenizer", refuse)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [COIN, {"prompt": "p", "targets": ["a", "b"], "weights": [1, -1]}]
    )
    with pytest.raises(ValueError, match="bad.jsonl line 2: weights: weight 2 is negative"):
        train(tiny_train_config(model_dir, tmp_path / "out", bad))
    ends = write_jsonl(tmp_path / "ends.jsonl", [{"prompt": "p", "targets": ["a<|im_end|>", "b"]}])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "ends.jsonl line 1: targets: answer 'a<|im_end|>' contains the end-of-turn"
        ),
    ):
        train(tiny_train_config(model_dir, tmp_path / "out", ends))
    with pytest.raises(ValueError, match=r"prompt: \d+ prompt tokens .* exceed max_seq_len=12"):
        train(
            tiny_train_config(
                model_dir,
                tmp_path / "out",
                write_jsonl(tmp_path / "ok.jsonl", [COIN]),
                max_seq_len=12,
            )
        )
    assert not (tmp_path / "out").exists()


def test_targets_flag_and_overrides(tmp_path):
    from calibft.cli import train_parser
    from calibft.config import given_flags

    args = train_parser().parse_args(["--targets", "a.jsonl,b.yaml", "--targets", "shipped:train"])
    assert given_flags(args, TrainConfig) == {"targets": ["a.jsonl", "b.yaml", "shipped:train"]}
    assert load_config(overrides=["targets=a.jsonl,b.jsonl"]).targets == ["a.jsonl", "b.jsonl"]
    preset = load_config(preset="quick-categorical")
    assert preset.targets == ["shipped:train"] and preset.eval == ["categorical"]
    with pytest.raises(ValueError, match="eval_config applies only with eval="):
        load_config(overrides=["eval_config=x.toml"])
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        load_config(overrides=["eval=nope"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["soft", "hard"])
def test_training_on_categorical_targets_end_to_end(
    model_dir, tmp_path, target_file, method, capsys
):
    """Alone (soft and hard) and mixed with a numeric family; the adapter is saved, the resolved
    config names the targets, and the exact before/after comparison lands in the model card."""
    heldout = write_jsonl(
        tmp_path / "heldout.jsonl",
        [{"prompt": "Say Yes or No.", "targets": ["Yes", "No"], "weights": [3, 7]}],
    )
    settings = tmp_path / "after-training.toml"
    settings.write_text(
        f"[categorical]\ntargets = [{str(heldout)!r}]\nper_group = 1\nsamples = 0\n"
    )
    output = train(
        tiny_train_config(
            model_dir,
            tmp_path / "alone",
            target_file,
            method=method,
            eval=["categorical"],
            eval_config=str(settings),
        )
    )
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 * 2 and all(
        math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics
    )  # 3 prompts, batch 2
    assert json.loads((output / "train_config.json").read_text())["targets"] == [str(target_file)]
    report = json.loads((output / "eval" / "report.json").read_text())
    result = report["benchmarks"]["categorical"]
    assert set(result["checkpoints"]) == {"base", "alone"} and len(result["items"]) == 2
    table = capsys.readouterr().out
    card = (output / "README.md").read_text()
    for record in result["items"]:
        assert record["samples"] == 0  # the comparison is exact only
        # one prompt: each checkpoint's mean over groups is its record's figure
        row = f"| {record['checkpoint']} | {record['exact_tv']:.4g} |"
        assert row in table and row in card
    assert "categorical targets from" in card and "## Before / after" in card
    mixed = train(
        tiny_train_config(
            model_dir,
            tmp_path / "mixed",
            target_file,
            method=method,
            families="gaussian",
            prompts_per_family=2,
            decimals=1,
            max_bins=16,
        )
    )
    lines = (mixed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # 2 numeric + 3 categorical prompts, batch 2
