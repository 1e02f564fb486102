"""The structured-sampling benchmark end to end on a tiny local model: reports, resume, adapters,
the vLLM path, and the CLI's errors."""

import json
import sys
import types
import warnings

import numpy as np
import pytest
from conftest import save_random_adapter
from tiny_models import tiny_model_dir
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from calibft.cli import main as cli_main
from calibft.eval.benchmarks import structured
from calibft.eval.benchmarks.structured import Config
from calibft.eval.benchmarks.structured.answers import parse_samples
from calibft.eval.config import EvalConfig
from calibft.eval.runner import evaluate
from calibft.lm.adapters import Checkpoint, check_adapter_matches, resolve_checkpoints

TINY = dict(selection="paper_selected", split="ood", samples=5, max_bins=48, max_new_tokens=4)


def run_eval(model_dir, output, adapters=(), *, plots=True, backend="hf", **settings):
    """`evaluate` of the structured benchmark with tiny sizes (overridable)."""
    shared = EvalConfig(
        model=str(model_dir),
        adapters=[str(a) for a in adapters],
        output=str(output),
        plots=plots,
        progress=False,
        backend=backend,
    )
    return evaluate(shared, {"structured": Config(**{**TINY, **settings})})


def items_of(report):
    return report["benchmarks"]["structured"]["items"]


def summary_of(report, name):
    return report["benchmarks"]["structured"]["checkpoints"][name]["test_ood_family"]


def main(argv):
    return cli_main(["eval", *argv])


@pytest.fixture(scope="module")
def run(model_dir, adapter_dir, tmp_path_factory):
    """One evaluation (base + adapter) shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("eval")
    return out, run_eval(model_dir, out, [adapter_dir])


def test_report_files_hold_the_computed_numbers(run) -> None:
    out, report = run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    result = report["benchmarks"]["structured"]
    assert list(result["checkpoints"]) == ["base", "soft-run"]
    assert set(result["checkpoints"]["base"]) == {"test_ood_family"}
    prompts = items_of(report)
    assert len(prompts) == 2 * 18  # 18 paper-selected OOD prompts per checkpoint
    cached = {
        (r["checkpoint"], r["family"], json.dumps(r["params"], sort_keys=True)): r
        for r in map(lambda p: json.loads(p.read_text()), (out / "cache").rglob("*.json"))
    }
    assert len(cached) == len(prompts)
    for p in prompts:
        record = cached[(p["checkpoint"], p["family"], json.dumps(p["params"], sort_keys=True))]
        assert p["valid_rate"] == record["valid_rate"]
        assert p["group"] == p["family"] and p["section"] == "test_ood_family"
        # the stored rate is what the parser gives on the stored example generations
        parsed = parse_samples(record["examples"], p["family"], p["params"])
        if len(record["examples"]) == TINY["samples"]:
            assert parsed.valid_rate == p["valid_rate"]
        assert p["logit_kl"] > 0
        assert 0 <= p["exact_valid_mass"] <= p["exact_valid_mass"] + p["exact_unresolved_mass"] <= 1
    for name in ("base", "soft-run"):
        ood = summary_of(report, name)
        mine = [p for p in prompts if p["checkpoint"] == name]
        family_means = [
            np.mean([p["logit_kl"] for p in mine if p["family"] == f])
            for f in {p["family"] for p in mine}
        ]
        assert ood["logit_kl"] == pytest.approx(np.mean(family_means))
        assert 0 <= ood["valid_rate"] <= 1
    markdown = (out / "report.md").read_text()
    assert "## structured" in markdown and "| figure | base | soft-run |" in markdown
    assert f"| logit_kl | {summary_of(report, 'base')['logit_kl']:.4g} |" in markdown
    assert (out / "plots" / "w1_test_ood_family.png").is_file()
    assert (out / "plots" / "overlay_test_ood_family_poisson.png").is_file()


def test_adapter_is_applied(run) -> None:
    _, report = run
    by = {(p["checkpoint"], p["family"], str(p["params"])): p for p in items_of(report)}
    diffs = [
        abs(p["logit_kl"] - by[("soft-run", p["family"], str(p["params"]))]["logit_kl"])
        for (c, *_), p in by.items()
        if c == "base"
    ]
    assert min(diffs) > 1e-6


def test_rerun_uses_the_cache(run, model_dir, adapter_dir, monkeypatch) -> None:
    out, report = run
    calls = []
    original = structured.run_item

    def counting(lm, item, config, state, seed):
        calls.append(item.key)
        return original(lm, item, config, state, seed)

    monkeypatch.setattr(structured, "run_item", counting)
    again = run_eval(model_dir, out, [adapter_dir], plots=False)
    assert items_of(again) == items_of(report) and calls == []
    # An interrupted run lacks some results: only those are computed again, with the same numbers.
    victim = sorted((out / "cache" / "structured" / "soft-run").glob("*.json"))[3]
    lost = json.loads(victim.read_text())
    victim.unlink()
    again = run_eval(model_dir, out, [adapter_dir], plots=False)
    assert len(calls) == 1
    assert json.loads(victim.read_text()) == lost
    assert again["benchmarks"] == report["benchmarks"]
    # A setting that changes results is never served from the cache; a selection setting is.
    run_eval(model_dir, out, [adapter_dir], plots=False, per_family=1)
    assert len(calls) == 1
    run_eval(model_dir, out, plots=False, per_family=1, kl_paths=2)
    assert len(calls) == 1 + 6


def test_evaluation_is_deterministic(model_dir, tmp_path) -> None:
    a = run_eval(model_dir, tmp_path / "a", plots=False, exact=False)
    b = run_eval(model_dir, tmp_path / "b", plots=False, exact=False)
    assert items_of(a) == items_of(b)
    assert all(p["exact_valid_mass"] is None for p in items_of(a))
    assert summary_of(a, "base")["exact_median_normalized_w1"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "0"], "samples must be an integer >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--exact-tolerance", "-1"], "exact_tolerance must be a number >= 0"),
        (["--decimals", "-1"], "decimals must be an integer in [0, 9]"),
        (["--decimals", "10"], "decimals must be an integer in [0, 9]"),
        (["--max-bins", "1"], "max_bins must be an integer in [2, 1048576]"),
        (["--exact-tolerance", "inf"], "exact_tolerance must be a number >= 0"),
        (["--adapter", "/does/not/exist"], "is not a directory"),
        (["nosuchbench"], "unknown benchmark 'nosuchbench'"),
        (["structured.nosuchkey=1"], "unknown structured key 'nosuchkey'"),
        (["samples=many"], "config key 'samples' expects int"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path) -> None:
    assert main([*argv, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "report.json").exists()


def test_empty_selection_is_an_error(model_dir, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(
        structured, "splits", lambda selection: {"test_ood_family": [], "test_unseen_params": []}
    )
    with pytest.raises(ValueError, match="select no items"):
        run_eval(model_dir, tmp_path)


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
        structured.check(checkpoint, Config(decimals=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        structured.check(checkpoint, Config(decimals=3))  # same format: silent
        structured.check(
            checkpoint, Config(decimals=5, exact=False)
        )  # no exact pass: nothing to warn
        (adapter / "train_config.json").unlink()
        structured.check(checkpoint, Config(decimals=5))  # not written by calibft train


def test_adapter_of_another_base_model_is_refused(model_dir, tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    names = {str(model_dir)}
    # Same architecture and shapes, but recorded as trained on another model.
    other_dir = tiny_model_dir(tmp_path / "other", arch="qwen2")
    other = save_random_adapter(
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
    wide_adapter = save_random_adapter(wide, tmp_path / "wide-adapter")
    with pytest.raises(ValueError, match="does not fit this base model"):
        check_adapter_matches(base, Checkpoint("wide-adapter", wide_adapter), names)
    # The right adapter passes.
    good = save_random_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "good")
    check_adapter_matches(base, Checkpoint("good", good), names)


def test_cli_refuses_mismatched_adapter_before_generation(
    model_dir, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(structured, "run_item", lambda *a, **k: pytest.fail("generation started"))
    other_dir = tiny_model_dir(tmp_path / "other", arch="qwen2")
    other = save_random_adapter(
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
    """The vLLM path must send the checkpoint's LoRA request with every adapter request (the
    authors' pipeline silently sampled the base model)."""
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
            first = params[0].kwargs  # one SamplingParams per prompt
            calls.append(("generate", prompts[0]["prompt_token_ids"], first, lora_request))
            outputs = [types.SimpleNamespace(token_ids=[15, 16]) for _ in range(first["n"])]
            return [types.SimpleNamespace(outputs=outputs)]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)

    report = run_eval(model_dir, tmp_path, [adapter_dir], backend="vllm", exact=False, plots=False)
    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["enable_lora"] is True
    generated = [c for c in calls if c[0] == "generate"]
    assert len(generated) == 2 * 18
    assert all(c[3] is None for c in generated[:18])
    assert all(
        c[3].path == str(adapter_dir.resolve()) and c[3].name == "soft-run" for c in generated[18:]
    )
    params = generated[0][2]
    assert params["temperature"] == 1.0 and params["top_p"] == 1.0 and params["max_tokens"] == 4
    assert params["n"] == TINY["samples"]
    # The stand-in engine's answer (tokens 15, 16) is what every record parsed.
    assert all(
        len(p["examples"]) == TINY["samples"]
        for p in map(json.loads, map(lambda f: f.read_text(), (tmp_path / "cache").rglob("*.json")))
    )
    assert len(items_of(report)) == 2 * 18


def test_cli_options_reach_the_config(monkeypatch, tmp_path, capsys) -> None:
    import calibft.eval.runner as runner

    seen = []
    monkeypatch.setattr(
        runner,
        "evaluate_rank",
        lambda shared, benches, ranks: seen.append((shared, benches)) or {"benchmarks": {}},
    )
    config_file = tmp_path / "eval.toml"
    config_file.write_text("seed = 4\n[structured]\nsamples = 7\nkl_paths = 3\n")
    argv = [
        "--decimals",
        "3",
        "--max-bins",
        "1001",
        "--exact-tolerance",
        "0.01",
        "--output",
        str(tmp_path),
        "--config",
        str(config_file),
        "structured.kl_paths=2",
        "--no-exact",
    ]
    assert main(argv) == 0
    ((shared, benches),) = seen
    config = benches["structured"]
    assert (config.decimals, config.max_bins, config.exact_tolerance, config.exact) == (
        3,
        1001,
        0.01,
        False,
    )
    assert (config.samples, config.kl_paths, shared.seed) == (7, 2, 4)


def test_eval_list_names_every_benchmark(capsys) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("structured ") and structured.DESCRIPTION in out


def test_adapter_directories_named_like_module_attributes_load(model_dir, tmp_path) -> None:
    """PEFT stores adapters in module dicts: names like 'train' or 'run.v2' must still work."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters = [
        save_random_adapter(model, tmp_path / name, seed=i)
        for i, name in enumerate(("train", "run.v2"))
    ]
    report = run_eval(model_dir, tmp_path / "out", adapters, plots=False, exact=False, per_family=1)
    assert list(report["benchmarks"]["structured"]["checkpoints"]) == ["base", "train", "run.v2"]
    kl = {(p["checkpoint"], p["family"]): p["logit_kl"] for p in items_of(report)}
    assert all(kl[("train", f)] != kl[("run.v2", f)] for _, f in kl)
