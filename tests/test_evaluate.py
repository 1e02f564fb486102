"""`calibft eval` end to end on a tiny local model: errors, reports, resume, adapters, vLLM path."""

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import tiny_model_dir
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import calibft.evaluate as ev
from calibft.evaluate import (
    Checkpoint,
    EvalConfig,
    check_adapter_matches,
    evaluate,
    main,
    resolve_checkpoints,
)
from calibft.parsing import parse_samples

TINY = dict(
    selection="paper_selected",
    split="ood",
    samples=5,
    max_bins=48,
    max_new_tokens=4,
    progress=False,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def _save_adapter(model, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return _save_adapter(model, tmp_path_factory.mktemp("adapters") / "soft-run")


@pytest.fixture(scope="module")
def run(model_dir, adapter_dir, tmp_path_factory):
    """One evaluation (base + adapter) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(model=str(model_dir), adapters=[str(adapter_dir)], output=str(out), **TINY)
    return out, evaluate(config)


def test_report_files_hold_the_computed_numbers(run) -> None:
    out, report = run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert list(report["checkpoints"]) == ["base", "soft-run"]
    assert set(report["checkpoints"]["base"]["splits"]) == {"test_ood_family"}
    prompts = report["prompts"]
    assert len(prompts) == 2 * 18  # 18 paper-selected OOD prompts per checkpoint
    cached = {
        (r["checkpoint"], r["family"], json.dumps(r["params"], sort_keys=True)): r
        for r in map(lambda p: json.loads(p.read_text()), (out / "cache").rglob("*.json"))
    }
    assert len(cached) == len(prompts)
    for p in prompts:
        record = cached[(p["checkpoint"], p["family"], json.dumps(p["params"], sort_keys=True))]
        assert p["valid_rate"] == record["valid_rate"]
        # the stored rate is what the parser gives on the stored example generations
        parsed = parse_samples(record["examples"], p["family"], p["params"])
        if len(record["examples"]) == TINY["samples"]:
            assert parsed.valid_rate == p["valid_rate"]
        assert p["logit_kl"] > 0
        # pruned exact pass: the true valid mass lies in [valid mass, valid mass + unresolved]
        assert 0 <= p["exact_valid_mass"] <= p["exact_valid_mass"] + p["exact_unresolved_mass"] <= 1
    for name in ("base", "soft-run"):
        ood = report["checkpoints"][name]["splits"]["test_ood_family"]
        mine = [p for p in prompts if p["checkpoint"] == name]
        assert ood["logit_kl"] == pytest.approx(
            np.mean(
                [
                    np.mean([p["logit_kl"] for p in mine if p["family"] == f])
                    for f in {p["family"] for p in mine}
                ]
            )
        )
        assert 0 <= ood["valid_rate"] <= 1
    markdown = (out / "report.md").read_text()
    assert "| metric | base | soft-run |" in markdown
    assert (out / "plots" / "w1_test_ood_family.png").is_file()
    assert (out / "plots" / "overlay_test_ood_family_poisson.png").is_file()


def test_adapter_is_applied(run) -> None:
    _, report = run
    by = {(p["checkpoint"], p["family"], str(p["params"])): p for p in report["prompts"]}
    diffs = [
        abs(p["logit_kl"] - by[("soft-run", p["family"], str(p["params"]))]["logit_kl"])
        for (c, *_), p in by.items()
        if c == "base"
    ]
    assert min(diffs) > 1e-6


def test_rerun_uses_the_cache(run, model_dir, adapter_dir, monkeypatch) -> None:
    out, report = run
    calls = []
    original = ev.evaluate_prompt

    def counting(*args, **kwargs):
        calls.append(args[2].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_prompt", counting)
    config = EvalConfig(
        model=str(model_dir), adapters=[str(adapter_dir)], output=str(out), plots=False, **TINY
    )
    assert evaluate(config)["prompts"] == report["prompts"]
    assert calls == []
    # An interrupted run lacks some results: only those are computed again, with the same numbers.
    victim = sorted((out / "cache" / "soft-run").glob("*.json"))[3]
    lost = json.loads(victim.read_text())
    victim.unlink()
    again = evaluate(config)
    assert calls == ["soft-run"]
    assert json.loads(victim.read_text()) == lost
    assert again["checkpoints"] == report["checkpoints"]


def test_evaluation_is_deterministic(model_dir, tmp_path) -> None:
    config = dict(model=str(model_dir), plots=False, exact=False, **TINY)
    a = evaluate(EvalConfig(output=str(tmp_path / "a"), **config))
    b = evaluate(EvalConfig(output=str(tmp_path / "b"), **config))
    assert a["prompts"] == b["prompts"]
    assert all(p["exact_valid_mass"] is None for p in a["prompts"])
    assert (
        a["checkpoints"]["base"]["splits"]["test_ood_family"]["exact_median_normalized_w1"] is None
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "0"], "samples must be an integer >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--exact-tolerance", "-1"], "exact_tolerance must be a finite number >= 0"),
        (["--decimals", "-1"], "decimals must be an integer >= 0"),
        (["--max-bins", "0"], "max_bins must be an integer >= 1"),
        (["--exact-tolerance", "inf"], "exact_tolerance must be a finite number >= 0"),
        (["--adapter", "/does/not/exist"], "is not a directory"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path) -> None:
    assert main([*argv, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "report.json").exists()


def test_empty_selection_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(
        ev, "splits", lambda selection: {"test_ood_family": [], "test_unseen_params": []}
    )
    with pytest.raises(ValueError, match="selects no prompts"):
        ev.select_prompts(EvalConfig(split="ood"))


def test_adapter_directory_checks(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        resolve_checkpoints([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="named 'base'"):
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "adapter_config.json").write_text("{}")
        (tmp_path / "base" / "adapter_model.safetensors").write_bytes(b"")
        resolve_checkpoints([str(tmp_path / "base")])


def test_adapter_trained_at_other_decimals_warns_when_exact(tmp_path) -> None:
    adapter = tmp_path / "run"
    adapter.mkdir()
    checkpoint = Checkpoint("run", adapter)
    (adapter / "train_config.json").write_text(json.dumps({"decimals": 3}))
    with pytest.warns(UserWarning, match="trained to write 3 decimals.*--decimals 3"):
        ev.warn_if_other_format(checkpoint, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.warn_if_other_format(checkpoint, 3)  # same format: silent
        (adapter / "train_config.json").unlink()
        ev.warn_if_other_format(checkpoint, 5)  # not written by calibft train: nothing to compare


def test_adapter_of_another_base_model_is_refused(model_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    names = {str(model_dir)}
    # Same architecture and shapes, but recorded as trained on another model.
    other_dir = tiny_model_dir(tmp_path / "other", arch="qwen2")
    other = _save_adapter(
        AutoModelForCausalLM.from_pretrained(other_dir), tmp_path / "other-adapter"
    )
    with pytest.raises(ValueError, match="trained on base model"):
        check_adapter_matches(base, Checkpoint("other-adapter", other), names)
    # Recorded under our name, but its matrices do not fit our modules.
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    wide.name_or_path = str(model_dir)
    wide_adapter = _save_adapter(wide, tmp_path / "wide-adapter")
    with pytest.raises(ValueError, match="does not fit this base model"):
        check_adapter_matches(base, Checkpoint("wide-adapter", wide_adapter), names)
    # The right adapter passes.
    good = _save_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "good")
    check_adapter_matches(base, Checkpoint("good", good), names)


def test_cli_refuses_mismatched_adapter_before_generation(
    model_dir, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(ev, "evaluate_prompt", lambda *a, **k: pytest.fail("generation started"))
    other_dir = tiny_model_dir(tmp_path / "other", arch="qwen2")
    other = _save_adapter(
        AutoModelForCausalLM.from_pretrained(other_dir), tmp_path / "other-adapter"
    )
    argv = [
        "--model",
        str(model_dir),
        "--adapter",
        str(other),
        "--output",
        str(tmp_path / "out"),
        "--split",
        "ood",
    ]
    assert main(argv) == 2
    assert "trained on base model" in capsys.readouterr().err


def test_vllm_backend_applies_the_adapter(model_dir, adapter_dir, tmp_path, monkeypatch) -> None:
    """The vLLM path must send a LoRA request for adapter checkpoints (SPEC §10)."""
    calls = []

    class LoRARequest:
        def __init__(self, name, int_id, path):
            self.name, self.int_id, self.path = name, int_id, path

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            calls.append(("init", kwargs))

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            calls.append(("generate", prompts[0]["prompt_token_ids"], params.kwargs, lora_request))
            outputs = [types.SimpleNamespace(token_ids=[15, 16]) for _ in range(params.kwargs["n"])]
            return [types.SimpleNamespace(outputs=outputs)]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)

    config = EvalConfig(
        model=str(model_dir),
        adapters=[str(adapter_dir)],
        output=str(tmp_path),
        backend="vllm",
        exact=False,
        plots=False,
        **TINY,
    )
    evaluate(config)
    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["enable_lora"] is True
    generated = [c for c in calls if c[0] == "generate"]
    assert len(generated) == 2 * 18
    base_requests = [c[3] for c in generated[:18]]
    adapter_requests = [c[3] for c in generated[18:]]
    assert all(r is None for r in base_requests)
    assert all(
        r.path == str(adapter_dir.resolve()) and r.name == "soft-run" for r in adapter_requests
    )
    params = generated[0][2]
    assert params["temperature"] == 1.0 and params["top_p"] == 1.0 and params["max_tokens"] == 4
    assert params["n"] == TINY["samples"]


def test_config_validation_names_the_field() -> None:
    for kwargs, field in [
        (dict(samples=0), "samples"),
        (dict(split="train"), "split"),
        (dict(selection="all"), "selection"),
        (dict(kl_paths=0), "kl_paths"),
        (dict(backend="tgi"), "backend"),
        (dict(seed=-1), "seed"),
    ]:
        with pytest.raises(ValueError, match=field):
            EvalConfig(**kwargs).validate()


def test_cli_options_reach_the_config(monkeypatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda config: seen.append(config) or {"checkpoints": {}})
    argv = ["--decimals", "3", "--max-bins", "1001", "--exact-tolerance", "0.01", "--output", str(tmp_path)]
    assert main(argv) == 0
    (config,) = seen
    assert (config.decimals, config.max_bins, config.exact_tolerance) == (3, 1001, 0.01)
