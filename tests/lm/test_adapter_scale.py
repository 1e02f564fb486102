"""The adapter-scale sweep: checkpoints `<adapter>@<scale>` (names, fingerprints, refusals), the
transformers session at a scale (0 is the base model, 1 the adapter as trained, exactly), the
scaled copy the vLLM backend loads, and a whole evaluation whose scale-0 and scale-1 records
equal the base model's and the unscaled adapter's, cached per scale and reused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from calibft.cli import main as cli_main
from calibft.eval.benchmarks import paloma, structured
from calibft.eval.config import EvalConfig, resolve
from calibft.eval.runner import evaluate
from calibft.lm import HFBackend
from calibft.lm.adapters import Checkpoint, resolve_checkpoints, write_scaled_adapter

PROMPT = "Pick a random number between 1 and 10."


def test_a_sweep_names_one_checkpoint_per_scale(adapter_dir) -> None:
    (base, plain) = resolve_checkpoints([str(adapter_dir)])
    assert (base.name, plain.name, plain.scale) == ("base", "soft-run", 1.0)
    swept = resolve_checkpoints([str(adapter_dir)], [0, 0.25, 1, 2.5])
    assert [c.name for c in swept] == [
        "base",
        "soft-run@0",
        "soft-run@0.25",
        "soft-run@1",
        "soft-run@2.5",
    ]
    assert [c.scale for c in swept[1:]] == [0.0, 0.25, 1.0, 2.5]
    assert all(c.adapter == adapter_dir.resolve() for c in swept[1:])
    fingerprints = [c.fingerprint for c in swept]
    assert len(set(fingerprints)) == len(fingerprints)  # a cache key per scale
    assert swept[3].fingerprint == plain.fingerprint  # scale 1 is the adapter as trained


def test_the_flag_file_and_override_give_a_list_of_scales(tmp_path, capsys) -> None:
    configs = {"paloma": paloma.Config}
    shared, _ = resolve(configs, flags={"adapter_scale": "0, 0.25,1"})
    assert shared.adapter_scale == [0.0, 0.25, 1.0]
    assert resolve(configs)[0].adapter_scale == [1.0]
    toml = tmp_path / "eval.toml"
    toml.write_text("adapter_scale = [0.5, 2]\n")
    assert resolve(configs, config_file=toml)[0].adapter_scale == [0.5, 2.0]
    assert resolve(configs, overrides=["adapter_scale=0.75"])[0].adapter_scale == [0.75]
    for bad, message in [
        ("0.5,-1", "must be a number >= 0, got -1.0"),
        ("half", "list of numbers"),
    ]:
        assert cli_main(["eval", "paloma", "--adapter-scale", bad, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be a number >= 0, got nan"):
        resolve(configs, flags={"adapter_scale": "nan"})


@pytest.mark.parametrize(
    ("adapters", "scales", "message"),
    [
        (True, [], "at least one scale"),
        (True, [0.5, 0.5], "lists a scale twice"),
        (False, [0.5], "give them with --adapter"),
    ],
)
def test_bad_sweeps_are_one_line(adapter_dir, adapters, scales, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_checkpoints([str(adapter_dir)] if adapters else [], scales)


@pytest.mark.parametrize("key", ["use_dora", "modules_to_save"])
def test_adapters_a_scale_does_not_scale_are_refused(adapter_dir, tmp_path, key) -> None:
    copy = shutil.copytree(adapter_dir, tmp_path / "copy")
    config = json.loads((copy / "adapter_config.json").read_text())
    config[key] = True if key == "use_dora" else ["lm_head"]
    (copy / "adapter_config.json").write_text(json.dumps(config))
    assert [c.name for c in resolve_checkpoints([str(copy)])] == ["base", "copy"]  # unscaled
    with pytest.raises(ValueError, match=f"sets {key}"):
        resolve_checkpoints([str(copy)], [0.5, 1])


def test_the_scaled_copy_multiplies_lora_b_only(adapter_dir, tmp_path) -> None:
    (_, checkpoint) = resolve_checkpoints([str(adapter_dir)], [0.3])
    copy = write_scaled_adapter(checkpoint, tmp_path / "scaled")
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scaled = load_file(str(copy / "adapter_model.safetensors"))
    assert scaled.keys() == original.keys()
    assert any(".lora_B." in k for k in original) and any(".lora_A." in k for k in original)
    for key, value in original.items():
        expected = value * 0.3 if ".lora_B." in key else value
        assert torch.equal(scaled[key], expected), key
    config = (adapter_dir / "adapter_config.json").read_bytes()
    assert (copy / "adapter_config.json").read_bytes() == config
    legacy = shutil.copytree(adapter_dir, tmp_path / "legacy")
    (legacy / "adapter_model.safetensors").rename(legacy / "adapter_model.bin")
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        write_scaled_adapter(Checkpoint("legacy@0.3", legacy, 0.3), tmp_path / "out")


def test_a_session_runs_the_adapter_at_its_scale(model_dir, adapter_dir, tmp_path) -> None:
    base, *swept = resolve_checkpoints([str(adapter_dir)], [0, 0.5, 1])
    plain = Checkpoint("soft-run", adapter_dir.resolve())
    half_copy = write_scaled_adapter(swept[1], tmp_path / "half")
    backend = HFBackend(str(model_dir), [base, *swept], device="cpu")
    ids = backend.chat.prompt_ids(PROMPT)

    def logprobs(checkpoint: Checkpoint) -> torch.Tensor:
        session = backend.session(checkpoint)
        return session.next_token_logprobs(session.prefill(ids))

    order = [
        base,
        swept[1],
        swept[2],
        base,
        swept[0],
        plain,
        swept[1],
        Checkpoint("copy", half_copy),
    ]
    at: dict[str, list[torch.Tensor]] = {}
    for checkpoint in order:
        at.setdefault(checkpoint.name, []).append(logprobs(checkpoint))
    # The base model after an adapter: PEFT's layers, now inside the base model, are off.
    assert torch.equal(at["base"][1], at["base"][0])
    assert torch.equal(at["soft-run@0"][0], at["base"][0])
    assert torch.equal(at["soft-run@1"][0], at["soft-run"][0])
    half, again = at["soft-run@0.5"]
    assert torch.equal(half, again)  # no scale left over from the checkpoints in between
    assert not torch.allclose(half, at["base"][0]) and not torch.allclose(half, at["soft-run"][0])
    # Scale s is B·A·(alpha/r)·s: the adapter with lora_B scaled by s, as vLLM is given it.
    torch.testing.assert_close(at["copy"][0], half, atol=1e-6, rtol=1e-6)


def _records(report, name, checkpoint):
    return [
        {k: v for k, v in r.items() if k != "checkpoint"}
        for r in report["benchmarks"][name]["items"]
        if r["checkpoint"] == checkpoint
    ]


@pytest.mark.slow  # end to end: four evaluations of two benchmarks
def test_a_sweeps_end_points_are_the_base_model_and_the_adapter(
    model_dir, adapter_dir, tmp_path, monkeypatch
) -> None:
    story = tmp_path / "story.txt"
    story.write_text("Pick a random number from a Gaussian distribution, then a Beta one. " * 4)
    configs = {
        "structured": structured.Config(
            split="ood", per_family=1, samples=6, max_new_tokens=4, max_bins=48, exact=False
        ),
        "paloma": paloma.Config(files=[str(story)], window=16, stride=8),
    }

    def run(output, scales):
        shared = EvalConfig(
            model=str(model_dir),
            adapters=[str(adapter_dir)],
            adapter_scale=scales,
            output=str(output),
            progress=False,
            device="cpu",
        )
        return evaluate(shared, configs)

    swept = run(tmp_path / "sweep", [0, 0.5, 1])
    plain = run(tmp_path / "plain", [1])
    for name in configs:
        names = list(swept["benchmarks"][name]["checkpoints"])
        assert names == ["base", "soft-run@0", "soft-run@0.5", "soft-run@1"]
        base = _records(swept, name, "base")
        assert base and _records(swept, name, "soft-run@0") == base
        assert _records(swept, name, "soft-run@1") == _records(plain, name, "soft-run")
        assert _records(swept, name, "soft-run@0.5") != base
        cache = tmp_path / "sweep/cache" / name
        files = {c: {p.name for p in (cache / c).glob("*.json")} for c in names}
        assert all(files.values())
        assert len(set().union(*files.values())) == sum(map(len, files.values()))  # distinct
    assert (tmp_path / "sweep/plots/pareto_paloma_structured.png").is_file()

    def no_model(*args, **kwargs):
        raise AssertionError("a cached record was recomputed")

    monkeypatch.setattr(HFBackend, "session", no_model)
    assert run(tmp_path / "sweep", [0, 0.5, 1])["benchmarks"] == swept["benchmarks"]
    assert run(tmp_path / "sweep", [0.5])["benchmarks"]["paloma"]["checkpoints"].keys() == {
        "base",
        "soft-run@0.5",
    }
