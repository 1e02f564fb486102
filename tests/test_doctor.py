"""`calibft doctor --device cpu`: passes on a healthy install, and each check fails (exit 1, the
failing line printed) when an error is planted in what it checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import calibft
import calibft.lm.sample as sample
from calibft.cli import main
from calibft.doctor import checks

FAST = ["doctor", "--device", "cpu", "--family", "llama,gemma2", "--dtype", "float32"]


def lines_of(out: str, check: str) -> list[str]:
    return [line for line in out.splitlines() if f" {check} " in line]


def test_doctor_fast_subset_passes_and_writes_json(tmp_path, capsys):
    report = tmp_path / "doctor.json"
    args = [*FAST, "--check", "exact_pass,fused_loss,sampler", "--output", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attention: llama sdpa" in out and "gemma2 eager" in out
    status = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines_of(out, "exact_pass")) == 2 and len(status) == 8
    assert all(line.startswith("PASS") for line in status)
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["devices"]["cuda_available"] is torch.cuda.is_available()
    assert {c["check"] for c in data["checks"]} == {
        "exact_pass",
        "fused_loss",
        "fused_grad",
        "sampler",
    }
    assert {"torch", "transformers", "peft", "accelerate"} <= set(data["versions"])
    for c in data["checks"]:
        assert c["passed"] and c["tolerance"] == checks.TOLERANCES[c["check"]][c["dtype"]]


def _shifted_exact(real):
    def exact(model, prompt_ids, trie):  # a context bug: the prompt's first token dropped
        return real(model, prompt_ids[1:], trie)

    return exact


def _hot_draw(real):
    def draw(logits, *args):  # samples the law at temperature 1.3
        return real(logits / 1.3, *args)

    return draw


def _scaled_loss(real):
    def fused(hidden, *args, **kwargs):  # hidden states 1% off before the head
        return real(hidden * 1.01, *args, **kwargs)

    return fused


def test_planted_errors_fail_their_check(monkeypatch, capsys):
    import calibft.train.loop as loop

    monkeypatch.setattr(calibft, "exact_logprobs", _shifted_exact(calibft.exact_logprobs))
    monkeypatch.setattr(sample, "draw_tokens", _hot_draw(sample.draw_tokens))
    monkeypatch.setattr(loop, "fused_sparse_kl", _scaled_loss(loop.fused_sparse_kl))
    assert main([*FAST, "--check", "exact_pass,fused_loss,sampler"]) == 1
    out = capsys.readouterr().out
    for check in ("exact_pass", "fused_loss", "fused_grad", "sampler"):
        found = lines_of(out, check)
        assert found and all(line.startswith("FAIL") for line in found), (check, out)
    assert "FAILED: exact_pass/llama/float32" in out


def test_bf16_tolerance_still_catches_a_shifted_prompt(monkeypatch, capsys):
    monkeypatch.setattr(calibft, "exact_logprobs", _shifted_exact(calibft.exact_logprobs))
    args = ["doctor", "--device", "cpu", "--family", "llama,gemma2", "--check", "exact_pass"]
    assert main([*args, "--dtype", "bfloat16"]) == 1
    found = lines_of(capsys.readouterr().out, "exact_pass")
    assert len(found) == 2 and all(line.startswith("FAIL") for line in found)


def test_a_tolerance_of_zero_fails(monkeypatch, capsys):
    monkeypatch.setitem(checks.TOLERANCES, "exact_pass", {"float32": 0.0, "bfloat16": 0.0})
    assert main([*FAST, "--check", "exact_pass", "--family", "llama"]) == 1
    assert lines_of(capsys.readouterr().out, "exact_pass")[0].startswith("FAIL")


def test_chi_square_has_power():
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    counts = np.bincount(rng.choice(4, size=6000, p=probs), minlength=4)
    assert checks.chi_square_p(counts, probs) > checks.CHI2_MIN_P
    assert checks.chi_square_p(counts, np.array([0.45, 0.3, 0.2, 0.05])) < checks.CHI2_POWER_P


def test_unknown_names_are_refused(capsys):
    assert main(["doctor", "--device", "cpu", "--family", "mistral"]) == 2
    assert "--family: unknown mistral" in capsys.readouterr().err


@pytest.mark.slow
def test_train_resume_check_and_a_resume_that_loses_state(monkeypatch, capsys):
    """The end-to-end check passes; a resume that restores nothing (training restarts from the
    initialisation at the checkpoint's step) fails it."""
    import calibft.train.loop as loop

    args = [*FAST, "--check", "train_resume", "--family", "llama"]
    assert main(args) == 0
    monkeypatch.setattr(loop, "load_checkpoint", lambda *a, **k: 1)
    assert main(args) == 1
    assert lines_of(capsys.readouterr().out, "train_resume")[-1].startswith("FAIL")


@pytest.mark.slow
def test_full_doctor_on_cpu(tmp_path, capsys):
    """What a user runs: every family, both dtypes, every check."""
    report = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--output", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and all(c["passed"] for c in data["checks"])
    assert {(c["family"], c["dtype"]) for c in data["checks"] if c["check"] == "exact_pass"} == {
        (f, d) for f in calibft.doctor.tiny.FAMILIES for d in ("float32", "bfloat16")
    }
