"""The runner's batches, shares and cache keys on a tiny local model: batched records equal
one-at-a-time records, a rank computes its share only, and records computed on one device kind
or dtype are never reused on another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from calibft.eval import load_benchmark
from calibft.eval.benchmarks import mcq, noveltybench, open_random, retention
from calibft.eval.benchmarks.retention.data import DATASETS
from calibft.eval.config import EvalConfig
from calibft.eval.contract import Item
from calibft.eval.runner import Ranks, cache_path, evaluate, evaluate_rank
from calibft.lm import Checkpoint
from calibft.lm import session as session_module
from calibft.lm.decode import lm_head_logits
from calibft.lm.session import placement

# One row per dataset (the retention benchmark's shapes), numbered into 100 distinct rows.
RETENTION_ROWS = {
    "tinyMMLU": {
        "question": "What is 2 + 2?",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "22"],
        "answer": 1,
        "input_formatted": "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:",
    },
    "tinyHellaswag": {
        "endings": ["bakes.", "sings.", "leaves.", "sleeps."],
        "label": "0",
        "input_formatted": "Baking cookies: A woman mixes flour. she",
    },
    "tinyTruthfulQA": {
        "mc2_targets": {"choices": ["Paris", "It is Paris", "Lyon"], "labels": [1, 1, 0]},
        "input_formatted": "Q: What is the capital of France?\nA:",
    },
    "tinyWinogrande": {
        "sentence": "The trophy does not fit in the suitcase because the _ is too small.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "2",
        "input_formatted": "The trophy does not fit in the suitcase because the suitcase",
    },
    "tinyGSM8k": {
        "answer": "48 + 24 = 72\n#### 72",
        "input_formatted": "Question: Natalia sold 48 clips and then 24. How many?\nAnswer:",
    },
}


def retention_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, row in RETENTION_ROWS.items():
        # A dataset file holds 100 rows; the tests score the first few (`limit`).
        unused = dict.fromkeys(DATASETS[name].fields - set(row), "")  # fields scoring ignores
        rows = [
            {**unused, **row, "input_formatted": f"{i}. " + row["input_formatted"]}
            for i in range(100)
        ]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def cached_records(output: Path) -> dict[str, dict]:
    """Every cache entry of a run (name -> record)."""
    return {
        str(path.relative_to(output)): json.loads(path.read_text())
        for path in sorted((output / "cache").rglob("*.json"))
    }


def shared(model_dir, output, adapter_dir, **settings) -> EvalConfig:
    return EvalConfig(
        model=str(model_dir),
        adapters=[str(adapter_dir)],
        output=str(output),
        progress=False,
        plots=False,
        **settings,
    )


@pytest.mark.parametrize("name", ["retention", "noveltybench", "open_random", "mcq"])
def test_batched_records_equal_one_at_a_time(
    name, model_dir, adapter_dir, tmp_path, monkeypatch
) -> None:
    config = {
        "retention": lambda: retention.Config(
            data=str(retention_data(tmp_path / "data")), limit=2, max_new_tokens=10
        ),
        "noveltybench": lambda: noveltybench.Config(
            splits=["curated"],
            per_split=3,
            samples=4,
            max_new_tokens=6,
            classifier="none",
            reward_model="none",
        ),
        "open_random": lambda: open_random.Config(prompts=3, samples=5, max_new_tokens=6),
        "mcq": lambda: mcq.Config(samples=230, max_new_tokens=5),  # shards of 100, 100, 30
    }[name]()
    module = load_benchmark(name)
    calls: list[int] = []

    def spy(lm, items, cfg, state, seeds):
        calls.append(len(items))
        return module.run_batch(lm, items, cfg, state, seeds)

    one = evaluate(shared(model_dir, tmp_path / "one", adapter_dir, batch_items=1), {name: config})
    assert calls == []
    monkeypatch.setattr(f"calibft.eval.benchmarks.{name}.run_batch", spy)
    batched = evaluate(
        shared(model_dir, tmp_path / "batched", adapter_dir, batch_items=4), {name: config}
    )
    items = len(one["benchmarks"][name]["items"])
    assert sum(calls) == items and max(calls) > 1 and max(calls) <= 4
    records = cached_records(tmp_path / "one")
    assert len(records) == items
    if name != "retention":  # generation: identical records
        assert cached_records(tmp_path / "batched") == records
        assert batched["benchmarks"][name] == one["benchmarks"][name]
        return
    # Log-likelihoods of rows scored in one padded batch move by float rounding only; every
    # decision (argmax scores, GSM8K generations) is identical.
    got = cached_records(tmp_path / "batched")
    assert got.keys() == records.keys()
    for key, record in records.items():
        other = dict(got[key])
        if record["dataset"] != "tinyGSM8k":
            assert other.pop("logprobs") == pytest.approx(record["logprobs"], rel=1e-5)
            assert other.pop("score") == pytest.approx(record["score"], rel=1e-5, abs=1e-7)
        assert other == {k: v for k, v in record.items() if k not in other.keys() ^ record.keys()}


def test_a_rank_computes_its_share_and_rank_0_waits_for_the_rest(
    model_dir, adapter_dir, tmp_path
) -> None:
    """Rank 1 of 2 runs alone first (its records land in the cache, it writes no report); rank 0
    then finds every record of rank 1 there, computes the others and writes the report."""
    config = {"mcq": mcq.Config(samples=250, max_new_tokens=4)}
    out = tmp_path / "sharded"
    assert evaluate_rank(shared(model_dir, out, adapter_dir), config, Ranks(1, 2, 0)) is None
    assert not (out / "report.json").exists()
    # 3 shards x 2 checkpoints, one block of batch_items per checkpoint: rank 1 has the adapter's.
    assert len(cached_records(out)) == 3
    assert {Path(k).parent.name for k in cached_records(out)} == {"soft-run"}
    report = evaluate_rank(shared(model_dir, out, adapter_dir), config, Ranks(0, 2, 0))
    assert report is not None and report["config"]["num_processes"] == 2
    single = evaluate(shared(model_dir, tmp_path / "single", adapter_dir), config)
    assert single["config"]["num_processes"] == 1
    assert cached_records(out) == cached_records(tmp_path / "single")
    assert report["benchmarks"] == single["benchmarks"]


def test_ranks_come_from_the_launchers_environment() -> None:
    assert Ranks.from_env({}) == Ranks(0, 1, None)
    assert Ranks.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Ranks(0, 1, None)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert Ranks.from_env(env) == Ranks(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4 is not one of 0..3"):
        Ranks.from_env({"WORLD_SIZE": "4", "RANK": "4"})


def test_placement_defaults_follow_the_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement("auto", "auto") == ("cpu", "float32")
    assert placement("auto", "auto", local_rank=1) == ("cpu", "float32")  # ranks on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement("auto", "auto") == ("auto", "bfloat16")  # device_map over every GPU
    assert placement("auto", "auto", local_rank=3) == ("cuda:3", "bfloat16")
    assert placement("cpu", "auto") == ("cpu", "float32")
    assert placement("cuda:1", "float32") == ("cuda:1", "float32")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        placement("cpu", "int8")


def test_device_auto_loads_with_device_map_auto(model_dir, monkeypatch) -> None:
    """With CUDA present, device=auto asks transformers for device_map="auto" (here served on the
    CPU), and the backend's placement says CUDA and bfloat16."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    asked = {}

    def from_pretrained(path, **kwargs):
        asked.update(kwargs)
        return real(path, **{**kwargs, "device_map": {"": "cpu"}})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    backend = session_module.HFBackend(str(model_dir), [Checkpoint("base")])
    assert asked["device_map"] == "auto" and asked["dtype"] == torch.bfloat16
    assert (backend.device_type, backend.dtype) == ("cuda", "bfloat16")


def test_lm_head_logits_follow_the_heads_device(tokenizer) -> None:
    """Under a device_map the head may sit elsewhere than the last layer: the hidden states move
    to it (a head on the meta device stands in for another GPU)."""
    model = tiny_model(tokenizer, arch="qwen2")  # an untied head
    model.lm_head.to("meta")
    hidden = torch.zeros(2, model.config.hidden_size)
    assert lm_head_logits(model, hidden).device.type == "meta"


def test_the_device_kind_and_dtype_are_in_every_cache_key(tmp_path) -> None:
    item = Item(("prompt",), "group")
    config = mcq.Config()
    path = lambda **placed: cache_path(  # noqa: E731
        tmp_path, "mcq", Checkpoint("base"), item, config, EvalConfig(), "model", placed
    )
    cpu = path(device="cpu", dtype="float32")
    assert cpu == path(device="cpu", dtype="float32")
    assert path(device="cuda", dtype="float32") != cpu != path(device="cpu", dtype="bfloat16")


def test_records_computed_on_a_cpu_are_not_reused_on_a_gpu(
    model_dir, adapter_dir, tmp_path, monkeypatch
) -> None:
    """A second run whose backend reports CUDA computes every record again (the placement is
    forced, the model still runs on the CPU)."""
    config = {"mcq": mcq.Config(samples=3, max_new_tokens=3)}
    out = tmp_path / "out"
    first = evaluate(shared(model_dir, out, adapter_dir), config)
    assert first["config"]["placement"] == {"device": "cpu", "dtype": "float32"}
    assert len(cached_records(out)) == 2
    monkeypatch.setattr(session_module, "device_type", lambda device: "cuda")
    second = evaluate(shared(model_dir, out, adapter_dir, dtype="float32"), config)
    assert second["config"]["placement"] == {"device": "cuda", "dtype": "float32"}
    assert len(cached_records(out)) == 4


def test_ranks_score_the_batches_one_process_scores(model_dir, adapter_dir, tmp_path) -> None:
    """Batched log-likelihoods depend on their batch through float rounding: ranks get whole
    batches (blocks of batch_items), so 2 ranks cache bit-identical records to 1 process."""
    data = retention_data(tmp_path / "data")
    config = {"retention": retention.Config(data=str(data), tasks=["tiny_mmlu"], limit=5)}
    out = tmp_path / "sharded"
    for rank in (1, 0):
        evaluate_rank(shared(model_dir, out, adapter_dir, batch_items=2), config, Ranks(rank, 2))
    evaluate(shared(model_dir, tmp_path / "single", adapter_dir, batch_items=2), config)
    assert len(cached_records(out)) == 10
    assert cached_records(out) == cached_records(tmp_path / "single")
