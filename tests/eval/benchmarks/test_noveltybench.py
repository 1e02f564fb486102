"""NoveltyBench: the lexical rule, the greedy partition, ratings, utility and summaries on
hand-worked cases; the classifier and reward model through tiny random models saved to local
directories (the real loading and scoring code); whole runs on the tiny LM through the runner and
the CLI; refusal of a scorer that cannot be loaded before anything is generated."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    Gemma2Config,
    Gemma2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from calibft.chat import ChatFormat
from calibft.cli import main
from calibft.eval.benchmarks import noveltybench as nb
from calibft.eval.benchmarks.noveltybench.scorers import (
    MAX_RESPONSE_TOKENS,
    RewardModel,
    SimilarityClassifier,
    classifier_tokenizer_name,
    pair_inputs,
)
from calibft.eval.config import EvalConfig
from calibft.eval.contract import Item
from calibft.eval.runner import evaluate
from calibft.lm.session import HFSession

_CORPUS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
    "Paris is the capital of France and Rome is the capital of Italy",
    "tell me a story about a girl and her dog alpha beta gamma delta",
] * 4


def _bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def build_classifier_dir(path: Path) -> Path:
    """A 2-layer DeBERTa-v2 pair classifier (no token-type embeddings, as in v3-large) with a
    BERT-style tokenizer ([PAD] [CLS] [SEP] [UNK]); its head is stretched so that P(same) varies
    across pairs."""
    tok = _bpe(["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        position_buckets=64,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = DebertaV2ForSequenceClassification(config).eval()
    # A random model's P(same) hardly varies: stretch and shift its label-1 logit so that pairs of
    # the corpus fall below the threshold, between it and 1/2, and above 1/2.
    probe = pair_inputs(
        tokenizer, _CORPUS[0], [a + " " + b for a in _CORPUS[:3] for b in _CORPUS[:3]]
    )
    with torch.no_grad():
        margin = model(**probe).logits @ torch.tensor([-1.0, 1.0])
        weight, bias = model.classifier.weight, model.classifier.bias
        scale = 3.0 / float(margin.std())
        weight[1] = weight[0] + scale * (weight[1] - weight[0])
        bias[1] = (
            bias[0]
            + scale * (bias[1] - bias[0])
            - scale * float(margin.median())
            + math.log(0.25 / 0.75)
        )
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_reward_dir(path: Path) -> Path:
    """A 2-layer Gemma-2 reward model (1 label) whose tokenizer, like Gemma's, adds <bos> when asked
    for special tokens and whose chat template starts with <bos>; its head is scaled so that raw
    rewards spread over several rating bins."""
    tok = _bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=GEMMA_LIKE_TEMPLATE,
    )
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=2048,
    )
    torch.manual_seed(2)
    model = Gemma2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(400.0)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return build_classifier_dir(tmp_path_factory.mktemp("similarity"))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return build_reward_dir(tmp_path_factory.mktemp("reward"))


LONG = "one two three four five six"  # six words: beyond the lexical rule


# ---- lexical rule and partition -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "verdict"),
    [
        ("New York", "York New", True),
        ("red apple", "blue car", False),
        ("  Paris ", "paris", True),  # case and surrounding whitespace are ignored
        ("", "", True),  # 0 shared words >= 0
        ("", "hello", False),
        ("a b c d", "a b x y", True),  # 2 * 2 >= 4: the tie is equivalent
        ("a b c d e", "a b c x y", True),  # 2 * 3 >= 5
        ("a b x y z", "a b c d e", False),  # 2 * 2 < 5
        ("the the the", "the", False),  # distinct words count: 2 * 1 < 3
        (LONG, LONG, None),  # six words: the classifier decides, even for identical text
        ("yes", LONG, None),  # the longer response decides
    ],
)
def test_lexical_rule(a, b, verdict) -> None:
    assert nb.lexically_equivalent(a, b) is verdict


def alpha_stub(calls: list[tuple[str, str]]):
    """Same iff both end in the same word; records every pair it is asked about."""

    def classify(anchor, others):
        calls.extend((anchor, o) for o in others)
        return [1.0 if o.split()[-1] == anchor.split()[-1] else 0.0 for o in others]

    return classify


def test_partition_of_the_reference_case() -> None:
    responses = [f"{LONG} alpha", f"{LONG} alpha", f"{LONG} beta", f"{LONG} alpha"]
    calls: list[tuple[str, str]] = []
    parts = nb.partition(responses, alpha_stub(calls))
    assert parts.classes == [0, 0, 1, 0] and parts.distinct == 2
    # Anchor 0 against 1, 2, 3; response 2 opens a class with nobody left to compare.
    assert parts.classifier_pairs == 3 and calls == [(responses[0], r) for r in responses[1:]]


def test_partition_compares_with_the_opening_response_only() -> None:
    # b matches a, c matches b but not a: c must open its own class (no transitive joining).
    a, b, c = f"{LONG} x y", f"{LONG} y z", f"{LONG} z w"

    def classify(anchor, others):
        return [1.0 if set(anchor.split()[-2:]) & set(o.split()[-2:]) else 0.0 for o in others]

    assert nb.partition([a, b, c], classify).classes == [0, 0, 1]


def test_short_pairs_never_reach_the_classifier() -> None:
    def classify(anchor, others):
        assert all(max(len(anchor.split()), len(o.split())) > nb.LEXICAL_MAX_WORDS for o in others)
        return [0.0] * len(others)

    parts = nb.partition(["Paris", "paris", "Rome", LONG, "Paris!"], classify)
    assert parts.classes == [0, 0, 1, 2, 3]
    assert parts.classifier_pairs == 3  # Paris/LONG, Rome/LONG, LONG/Paris!


def test_classifier_threshold_is_strict() -> None:
    def constant(p):
        return lambda anchor, others: [p] * len(others)

    assert nb.partition([LONG, LONG + " x"], constant(nb.SIMILARITY_THRESHOLD)).distinct == 2
    assert nb.partition([LONG, LONG + " x"], constant(nb.SIMILARITY_THRESHOLD + 1e-6)).distinct == 1


def test_lexical_only_partition_counts_undecided_pairs_as_different() -> None:
    responses = [LONG, LONG, "Rome", "rome"]
    parts = nb.partition(responses, None)
    assert parts.classes == [0, 1, 2, 2]
    assert parts.classifier_pairs == 3 + 2  # anchor 0: 1, 2, 3; anchor 1: 2, 3


# ---- ratings, scores, utility, summaries --------------------------------------------------------


def test_rating_bins_at_their_boundaries() -> None:
    t = nb.RATING_THRESHOLDS
    assert len(t) == 9 and list(t) == sorted(t)
    for k, threshold in enumerate(t):
        assert nb.rating(threshold) == k + 1  # a tie falls in the lower bin
        assert nb.rating(math.nextafter(threshold, math.inf)) == k + 2
    assert (
        nb.rating(-100.0) == 1
        and nb.rating(-1.0) == 10
        and nb.rating(-5.2) == 6
        and nb.rating(50.0) == 10
    )
    with pytest.raises(ValueError, match="finite"):
        nb.rating(math.nan)


def test_first_member_scores() -> None:
    generation, partition_scores = nb.first_member_scores([0, 0, 1, 0, 2], [5, 7, 3, 9, 2])
    assert generation == [5, 0, 3, 0, 2] and partition_scores == [5, 3, 2]


def test_utility_hand_worked() -> None:
    assert nb.utility([10, 6, 0]) == pytest.approx((10 + 0.8 * 6) / (1 + 0.8 + 0.64))  # 6.0656
    assert nb.utility([10, 6, 0]) == pytest.approx(6.0656, abs=1e-4)
    denominator = sum(0.8**g for g in range(10))
    assert denominator == pytest.approx(4.4631, abs=1e-4)
    assert nb.utility([10] + [0] * 9) == pytest.approx(10 / denominator)
    assert nb.utility([7] * 10) == pytest.approx(7.0)
    assert nb.utility([2, 4], patience=1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        nb.utility([])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="patience"):
            nb.utility([1.0], patience=bad)


@given(st.lists(st.integers(0, 10), min_size=1, max_size=10))
def test_patience_zero_counts_the_first_generation_only(scores) -> None:
    """Patience 0 is defined (p^0 = 1, p^g = 0 after): the utility is the first score."""
    assert nb.utility(scores, patience=0.0) == scores[0]
    # and it is the limit of small patience
    assert nb.utility(scores, patience=1e-9) == pytest.approx(scores[0], abs=1e-6)


def test_config_accepts_patience_zero() -> None:
    from calibft.config import build

    assert build(nb.Config, {"patience": 0}).patience == 0
    with pytest.raises(ValueError, match="patience"):
        build(nb.Config, {"patience": -0.5})


def _row(split, distinct, utility, judge="classifier", empty=0, truncated=0, pairs=0):
    return {
        "split": split,
        "distinct": distinct,
        "utility": utility,
        "judge": judge,
        "tokens": [1] * 10,
        "empty": empty,
        "truncated": truncated,
        "classifier_pairs": pairs,
    }


def test_summary_means_per_split_and_pooled() -> None:
    rows = [
        _row("curated", 2, 3.0, empty=1),
        _row("curated", 4, 5.0, truncated=2),
        _row("wildchat", 9, 8.0, pairs=6),
    ]
    summary = nb.summarize(rows, None)
    assert summary["curated"]["mean_distinct"] == 3.0 and summary["curated"]["mean_utility"] == 4.0
    assert (
        summary["curated"]["empty_rate"] == 1 / 20
        and summary["curated"]["truncated_rate"] == 2 / 20
    )
    assert (
        summary["wildchat"]["mean_distinct"] == 9.0
        and summary["wildchat"]["classifier_pairs_per_prompt"] == 6
    )
    # Pooled over prompts (each prompt weighs the same), not the mean of the two split means.
    assert summary["all"]["mean_distinct"] == pytest.approx(5.0) and summary["all"][
        "mean_utility"
    ] == pytest.approx(16 / 3)
    assert summary["curated"]["mean_distinct_lexical"] is None
    assert "all" not in nb.summarize(rows[:2], None)


def test_summary_without_reward_model_or_classifier() -> None:
    no_rm = nb.summarize([_row("curated", 3, None), _row("curated", 5, None)], None)["curated"]
    assert no_rm["mean_distinct"] == 4.0 and no_rm["mean_utility"] is None
    lexical = nb.summarize(
        [_row("curated", 3, None, "lexical"), _row("curated", 5, None, "lexical")], None
    )["curated"]
    assert lexical["mean_distinct"] is None and lexical["mean_distinct_lexical"] == 4.0


# ---- data and config ----------------------------------------------------------------------------


def test_shipped_prompts_match_the_published_files() -> None:
    folder = resources.files("calibft") / "data" / "noveltybench"
    digests = {
        f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
        for f in ("curated.jsonl", "wildchat_1k.jsonl")
    }
    assert digests["curated.jsonl"].startswith("ca9b6f47") and digests["curated.jsonl"].endswith(
        "1fa7"
    )
    assert digests["wildchat_1k.jsonl"].startswith("85342880") and digests[
        "wildchat_1k.jsonl"
    ].endswith("54ca")
    curated, wildchat = nb.load_prompts("curated"), nb.load_prompts("wildchat")
    assert len(curated) == 100 and len(wildchat) == 1000
    assert curated[0].id == "curated-0" and curated[0].category == "Creativity"
    assert all(p.id.startswith("WildChat-") and p.category is None for p in wildchat)
    assert all(p.prompt and p.prompt == p.prompt.strip() for p in curated + wildchat)


def test_items_are_evenly_spaced_with_stable_keys() -> None:
    everything = nb.items(nb.Config())
    assert len(everything) == 1100 and len({i.key for i in everything}) == 1100
    few = nb.items(nb.Config(splits=["curated"], per_split=3))
    assert [i.key for i in few] == [
        ("curated", "curated-0"),
        ("curated", "curated-50"),
        ("curated", "curated-99"),
    ]
    assert {i.key for i in few} <= {i.key for i in everything} and all(
        i.section == "curated" for i in few
    )
    assert few[0].group == "Creativity"
    assert {i.group for i in nb.items(nb.Config(splits=["wildchat"], per_split=2))} == {"wildchat"}


def test_config_refuses_utility_on_a_lexical_partition() -> None:
    from calibft.config import build

    with pytest.raises(ValueError, match="--reward-model none"):
        build(nb.Config, {"classifier": "none"})
    with pytest.raises(ValueError, match="splits"):
        build(nb.Config, {"splits": "mixed"})
    assert build(nb.Config, {"classifier": "none", "reward_model": "none"}).classifier == "none"


# ---- scorers on tiny random models --------------------------------------------------------------


def test_classifier_pair_format(classifier_dir) -> None:
    clf = SimilarityClassifier.load(str(classifier_dir), str(classifier_dir), "cpu")
    tok = clf.tokenizer
    long_text = " ".join(["the quick brown fox"] * 100)
    batch = pair_inputs(tok, long_text, ["Paris", "the lazy dog"])
    a = tok(long_text, add_special_tokens=False)["input_ids"][:MAX_RESPONSE_TOKENS]
    b = tok("the lazy dog", add_special_tokens=False)["input_ids"]
    expected = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
    assert len(a) == MAX_RESPONSE_TOKENS and batch["input_ids"][1].tolist() == expected
    assert batch["token_type_ids"][1].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    short = len(expected) - len(b) + len(tok("Paris", add_special_tokens=False)["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (len(expected) - short)
    assert batch["input_ids"][0, short:].tolist() == [tok.pad_token_id] * (len(expected) - short)


def test_classifier_scores_are_batch_invariant_and_thresholded(classifier_dir) -> None:
    clf = SimilarityClassifier.load(str(classifier_dir), str(classifier_dir), "cpu")
    texts = [*_CORPUS[:3], "the lazy dog sleeps " * 3, "alpha beta gamma delta epsilon zeta"]
    batched = clf.same_probability(texts[0], texts[1:])
    single = [clf.same_probability(texts[0], [o])[0] for o in texts[1:]]
    # Padding and the mask change nothing (beyond float noise, which the stretched head amplifies).
    assert batched == pytest.approx(single, abs=1e-3)
    pairs = [(a, b) for a in texts for b in texts if a != b]
    probabilities = [clf.same_probability(a, [b])[0] for a, b in pairs]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    # Some pairs fall below the threshold and some between it and 1/2 (where argmax would differ).
    assert min(probabilities) < nb.SIMILARITY_THRESHOLD and any(
        nb.SIMILARITY_THRESHOLD < p < 0.5 for p in probabilities
    )
    for (a, b), p in zip(pairs, probabilities, strict=True):
        assert nb.partition([a, b], clf.same_probability).distinct == (
            1 if p > nb.SIMILARITY_THRESHOLD else 2
        )


def test_reward_inputs_have_one_bos_and_scores_are_batch_invariant(reward_dir) -> None:
    rm = RewardModel.load(str(reward_dir), "cpu", torch.float32)
    bos = rm.tokenizer.bos_token_id
    assert rm.tokenizer("hello")["input_ids"][0] == bos  # the tokenizer would add one by itself
    responses = ["", "a story", "the quick brown fox jumps over the lazy dog " * 4]
    batch = rm.inputs("tell me a story", responses)
    for row, mask in zip(
        batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True
    ):
        assert row.count(bos) == 1 and row[0] == bos
        assert row[sum(mask) :] == [rm.tokenizer.pad_token_id] * (len(row) - sum(mask))
    rewards = rm.rewards("tell me a story", responses)
    assert rewards == pytest.approx(
        [rm.rewards("tell me a story", [r])[0] for r in responses], abs=1e-4
    )
    assert len({nb.rating(r) for r in rewards}) > 1  # the scaled head spreads them over bins


def test_classifier_tokenizer_location(classifier_dir, tmp_path) -> None:
    assert classifier_tokenizer_name(str(classifier_dir), None) == str(classifier_dir)
    assert classifier_tokenizer_name(str(tmp_path), None) == "microsoft/deberta-v3-large"
    assert classifier_tokenizer_name(nb.PAPER_CLASSIFIER, None) == "microsoft/deberta-v3-large"
    assert classifier_tokenizer_name(str(classifier_dir), "some/tok") == "some/tok"


# ---- run_item on bad generations ----------------------------------------------------------------


@dataclass
class CannedLM:
    """An LM whose completions are given: empty, truncated, garbage bytes, a reasoning block."""

    completions: list[list[int]]
    tokenizer: object = field(default_factory=tiny_tokenizer)
    seeds: list[int] = field(default_factory=list)

    def prefill(self, ids):
        return ids

    def sample(self, state, n, *, seed, max_new_tokens):
        self.seeds.append(seed)
        assert n == len(self.completions)
        return self.completions

    @property
    def chat(self):
        return ChatFormat.from_tokenizer(self.tokenizer)

    def decode(self, ids, *, special=True):
        return self.tokenizer.decode(ids, skip_special_tokens=not special)


def scorers(classifier, reward):
    """Run state whose scorers are already loaded."""
    state = nb.Scorers(nb.Config(classifier="none", reward_model="none"))
    state.loaded = (classifier, reward)
    return state


class FixedRewards:
    def __init__(self, rewards):
        self.values = rewards

    def rewards(self, prompt, responses):
        assert len(responses) == len(self.values)
        return self.values


def test_empty_truncated_and_garbage_generations_are_counted(tmp_path) -> None:
    lm = CannedLM([])
    tok = lm.tokenizer
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    garbage = tok.convert_tokens_to_ids(["ÿ", "þ", "Ā"]) * 3  # byte tokens that are not valid UTF-8
    truncated = (enc("Rome is ") * 64)[:64]
    lm.completions = [
        [],
        enc("Paris"),
        enc("  paris "),
        truncated,
        garbage,
        enc("<think>hmm</think>Paris"),
        [],
    ]
    config = nb.Config(samples=7, max_new_tokens=64, classifier="none", reward_model="none")
    prompt = nb.Prompt("curated", "curated-x", "Name a city.", "Factual Knowledge")
    item = Item(("curated", "curated-x"), "Factual Knowledge", prompt, "curated")
    record = nb.run_item(lm, item, config, scorers(None, None), seed=123)
    json.dumps(record, allow_nan=False)
    assert lm.seeds == [123] and record["seed"] == 123
    assert record["generations"][0] == "" and record["generations"][5] == "Paris"
    assert record["empty"] == 2 and record["truncated"] == 1 and record["tokens"][3] == 64
    assert (
        "\ufffd" in record["generations"][4]
    )  # undecodable bytes come out as replacement characters
    # "", "Paris", "paris", "Rome is Rome is ...", garbage, "Paris" (reasoning removed), ""
    assert (
        record["partition"][:3] == [0, 1, 1]
        and record["partition"][5] == 1
        and record["partition"][6] == 0
    )
    assert record["utility"] is None and record["judge"] == "lexical"

    rewards = FixedRewards([-1.0, -5.2, -9.0, -3.0, -6.0, 0.0, -2.0])
    with_rm = nb.run_item(lm, item, config, scorers(None, rewards), seed=123)
    assert with_rm["ratings"] == [10, 6, 1, 9, 3, 10, 10]
    opens = [
        c == max(with_rm["partition"][:g], default=-1) + 1
        for g, c in enumerate(with_rm["partition"])
    ]
    assert with_rm["generation_scores"] == [
        r if o else 0 for r, o in zip(with_rm["ratings"], opens, strict=True)
    ]
    assert with_rm["utility"] == pytest.approx(nb.utility(with_rm["generation_scores"]))

    bad = scorers(None, FixedRewards([math.nan] * 7))
    with pytest.raises(ValueError, match="non-finite reward"):
        nb.run_item(lm, item, config, bad, seed=1)


# ---- whole runs ---------------------------------------------------------------------------------


def run_nb(model_dir, output, adapters=(), **settings):
    shared = EvalConfig(
        model=str(model_dir),
        adapters=[str(a) for a in adapters],
        output=str(output),
        progress=False,
    )
    config = nb.Config(
        **{
            "splits": ["curated", "wildchat"],
            "per_split": 2,
            "samples": 4,
            "max_new_tokens": 6,
            **settings,
        }
    )
    return evaluate(shared, {"noveltybench": config})


def test_run_with_classifier_and_no_reward_model(
    model_dir, adapter_dir, classifier_dir, tmp_path
) -> None:
    report = run_nb(
        model_dir,
        tmp_path / "out",
        [adapter_dir],
        classifier=str(classifier_dir),
        reward_model="none",
    )
    result = report["benchmarks"]["noveltybench"]
    assert list(result["checkpoints"]) == ["base", "soft-run"]
    for name, summary in result["checkpoints"].items():
        for split in ("curated", "wildchat"):
            mine = [i for i in result["items"] if i["checkpoint"] == name and i["split"] == split]
            assert len(mine) == 2 and all(
                1 <= i["distinct"] <= 4 and len(i["partition"]) == 4 for i in mine
            )
            assert summary[split]["mean_distinct"] == pytest.approx(
                sum(i["distinct"] for i in mine) / 2
            )
            assert summary[split]["mean_utility"] is None and summary[split]["prompts"] == 2
        assert "all" in summary
    assert "generations" not in result["items"][0]  # bulky text stays in the cache
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["benchmarks"]["noveltybench"]["checkpoints"] == result["checkpoints"]
    assert (tmp_path / "out" / "plots" / "noveltybench_distinct_curated.png").is_file()
    cached = list((tmp_path / "out" / "cache" / "noveltybench" / "base").glob("*.json"))
    record = json.loads(cached[0].read_text())
    assert len(record["generations"]) == 4 and len(record["raw_generations"]) == 4


def test_run_with_the_tiny_reward_model(model_dir, classifier_dir, reward_dir, tmp_path) -> None:
    with pytest.warns(UserWarning, match="rating thresholds were set for"):
        report = run_nb(
            model_dir,
            tmp_path / "out",
            splits=["curated"],
            classifier=str(classifier_dir),
            reward_model=str(reward_dir),
            reward_dtype="float32",
        )
    result = report["benchmarks"]["noveltybench"]
    items = result["items"]
    for item in items:
        assert len(item["raw_rewards"]) == 4
        ratings = [nb.rating(r) for r in item["raw_rewards"]]
        assert item["generation_scores"] == nb.first_member_scores(item["partition"], ratings)[0]
        assert item["utility"] == pytest.approx(nb.utility(item["generation_scores"]))
    summary = result["checkpoints"]["base"]["curated"]
    assert summary["mean_utility"] == pytest.approx(sum(i["utility"] for i in items) / len(items))


def test_cli_runs_lexical_only_and_reuses_the_cache(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "eval",
        "noveltybench",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--classifier",
        "none",
        "--reward-model",
        "none",
        "--splits",
        "curated",
        "--per-split",
        "3",
        "--samples",
        "3",
        "--max-new-tokens",
        "5",
        "--no-progress",
        "--no-plots",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "report.json").read_text())["benchmarks"]["noveltybench"][
        "checkpoints"
    ]["base"]
    assert (
        summary["curated"]["mean_distinct"] is None
        and 1 <= summary["curated"]["mean_distinct_lexical"] <= 3
    )
    assert "noveltybench" in capsys.readouterr().out
    files = sorted((out / "cache" / "noveltybench" / "base").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 3
    # curated-50 is one of the three cached prompts; the selection is not part of the cache key.
    assert main([*argv, "--per-split", "1"]) == 0
    assert sorted((out / "cache" / "noveltybench" / "base").glob("*.json")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    report = json.loads((out / "report.json").read_text())["benchmarks"]["noveltybench"]
    assert [i["id"] for i in report["items"]] == ["curated-50"]


@pytest.mark.parametrize("flag", ["--classifier", "--reward-model"])
def test_unloadable_scorer_is_refused_before_generation(
    model_dir, classifier_dir, tmp_path, capsys, monkeypatch, flag
) -> None:
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(HFSession, "sample", no_generation)
    missing = tmp_path / "not-downloaded"
    scorers = {"--classifier": str(classifier_dir), "--reward-model": "none"}
    scorers[flag] = str(missing)
    out = tmp_path / "out"
    argv = [
        "eval",
        "noveltybench",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--no-progress",
        "--classifier",
        scorers["--classifier"],
        "--reward-model",
        scorers["--reward-model"],
    ]
    assert main(argv) == 2
    # stderr also holds transformers' progress bar of the LM load; the error is one line of its own.
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert (
        err.startswith("calibft eval: error: noveltybench:")
        and str(missing) in err
        and f"{flag} DIR" in err
    )
    assert not (out / "cache").exists()


def test_wrong_kind_of_scorer_is_refused(
    model_dir, classifier_dir, reward_dir, tmp_path, capsys
) -> None:
    base = [
        "eval",
        "noveltybench",
        "--model",
        str(model_dir),
        "--output",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert (
        main([*base, "--classifier", str(classifier_dir), "--reward-model", str(classifier_dir)])
        == 2
    )
    assert "has 2 labels; a reward model has 1" in capsys.readouterr().err
    assert main([*base, "--classifier", str(reward_dir), "--reward-model", "none"]) == 2
    assert "has 1 labels" in capsys.readouterr().err
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((classifier_dir / "config.json").read_text())
    assert main([*base, "--classifier", str(weightless), "--reward-model", "none"]) == 2
    assert "no weights" in capsys.readouterr().err


def test_chat_prompt_is_the_single_user_message(model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat.from_tokenizer(tokenizer)
    (item,) = nb.items(nb.Config(splits=["curated"], per_split=1))
    prompts = []

    class Recording:
        def __init__(self):
            self.chat = chat

        def prefill(self, ids):
            prompts.append(ids)
            return ids

        def sample(self, state, n, *, seed, max_new_tokens):
            return [[] for _ in range(n)]

        def decode(self, ids, *, special=True):
            return ""

    config = nb.Config(samples=2, classifier="none", reward_model="none")
    nb.run_item(Recording(), item, config, scorers(None, None), seed=0)
    assert prompts == [chat.prompt_ids(item.payload.prompt)]


@pytest.mark.slow
def test_bench_quick_mode_writes_its_figures(model_dir, tmp_path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[3] / "benches" / "bench_noveltybench.py"
    output = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(bench), "--quick", "--model", str(model_dir), "--output", str(output)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    data = json.loads(output.read_text())
    assert (
        data["bench"] == "noveltybench"
        and data["mode"] == "quick"
        and data["splits"] == ["curated"]
    )
    (row,) = data["timings"]
    assert row["wall_s"] > 0 and row["per_prompt_s"] == pytest.approx(row["generate_s"] / 2)
    assert data["extrapolated_generate_s"]["base"] == pytest.approx(row["per_prompt_s"] * 100)
    assert data["lexical_partition_records"] == 2
    summary = data["summaries"]["base"]["curated"]
    assert summary["mean_distinct"] is None and 1 <= summary["mean_distinct_lexical"] <= 3
    report = json.loads(Path(data["report_json"]).read_text())
    assert report["benchmarks"]["noveltybench"]["checkpoints"] == data["summaries"]
