"""`calibft doctor`: a self-check to run on the machine of a long job before starting it.

It prints the versions and devices, the attention implementation each supported family loads
with, then the exactness checks (`calibft.doctor.checks`) on tiny random models of every family,
in float32 and bfloat16, on the chosen device: one line per check with pass/fail, its figure, its
tolerance, its time and peak memory. Nothing is downloaded. docs/doctor.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from calibft.doctor import checks
from calibft.doctor.tiny import FAMILIES
from calibft.files import atomic_write_text

PACKAGES = ("calibft", "torch", "transformers", "peft", "accelerate", "numpy", "scipy")


@dataclass(frozen=True)
class Result:
    check: str
    family: str
    dtype: str
    passed: bool
    figure: float
    tolerance: float
    seconds: float
    peak_gib: float
    error: str | None = None

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        detail = f"  {self.error}" if self.error else ""
        op = ">=" if self.check in checks.AT_LEAST else "<="
        return (
            f"{status} {self.check:<12} {self.family:<9} {self.dtype:<8} "
            f"{self.figure:9.2e} {op} {self.tolerance:<7.2g} {self.seconds:6.2f} s  "
            f"peak {self.peak_gib:.2f} GiB{detail}"
        )


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def devices() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    return info


def attention_implementations() -> dict[str, str]:
    """The attention implementation calibft loads each family with (from its config)."""
    from calibft.doctor.tiny import family_config, tiny_tokenizer
    from calibft.lm.attention import attention_implementation

    tokenizer = tiny_tokenizer()
    return {f: attention_implementation(family_config(tokenizer, f)) for f in FAMILIES}


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Training (accelerate) follows ACCELERATE_USE_CPU: keep it on the chosen device."""
    saved = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true" if device.type == "cpu" else "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_check(s: checks.Setup, name: str, family: str, dtype: str) -> list[Result]:
    """One check (two results for fused_loss: loss and gradients); an exception is a failure."""
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    started = time.perf_counter()
    error = None
    with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
        try:
            figures = checks.CHECKS[name](s, family, dtype)
        except Exception as err:  # the doctor reports every failure and goes on
            figures, error = float("nan"), f"{type(err).__name__}: {str(err).splitlines()[0]}"
    seconds, peak = time.perf_counter() - started, _peak_gib(s.device)
    names = ["fused_loss", "fused_grad"] if name == "fused_loss" else [name]
    if not isinstance(figures, tuple):
        figures = (figures,) * len(names)
    out = []
    for check, figure in zip(names, figures, strict=True):
        tolerance = checks.TOLERANCES[check][dtype]
        within = figure >= tolerance if check in checks.AT_LEAST else figure <= tolerance
        passed = error is None and bool(within)
        out.append(
            Result(check, family, dtype, passed, float(figure), tolerance, seconds, peak, error)
        )
    return out


def run(
    device: str,
    *,
    dtypes: Sequence[str] = tuple(checks.DTYPES),
    families: Sequence[str] = FAMILIES,
    only: Sequence[str] = tuple(checks.CHECKS),
    output: Path | None = None,
) -> int:
    """Print the environment and one line per check; write the JSON report to ``output``.
    Returns the exit status: 0 when every check passed, 1 otherwise."""
    for name, values, known in (
        ("--dtype", dtypes, checks.DTYPES),
        ("--family", families, FAMILIES),
        ("--check", only, checks.CHECKS),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(
                f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
            )
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; pass --device cpu")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "versions": versions(),
        "devices": devices(),
        "attention": attention_implementations(),
    }
    print(", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(
        ", ".join(f"{k} {v}" for k, v in report["devices"].items() if k != "gpus")
        + "".join(
            f"; {g['name']} ({g['memory_gib']} GiB)" for g in report["devices"].get("gpus", [])
        )
    )
    print("attention: " + ", ".join(f"{k} {v}" for k, v in report["attention"].items()))
    print(
        f"checks on {device}: status, check, family, dtype, figure vs tolerance, time, peak memory"
    )
    target = torch.device(device)
    s = checks.setup(target)
    results: list[Result] = []
    with _on_device(target):
        for dtype in dtypes:
            for name in only:
                chosen = checks.TRAIN_FAMILIES if name == "train_resume" else families
                for family in [f for f in families if f in chosen]:
                    for result in run_check(s, name, family, dtype):
                        print(result.line(), flush=True)
                        results.append(result)
    failed = [r for r in results if not r.passed]
    report.update(
        device=device,
        # JSON has no NaN: a check that raised has no figure.
        checks=[{**asdict(r), "figure": r.figure if r.error is None else None} for r in results],
        passed=not failed,
        seconds=round(time.perf_counter() - started, 2),
    )
    print(
        f"{len(results) - len(failed)} of {len(results)} checks passed in {report['seconds']:.1f} s"
        + (
            f"; FAILED: {', '.join(f'{r.check}/{r.family}/{r.dtype}' for r in failed)}"
            if failed
            else ""
        )
    )
    if output is not None:
        atomic_write_text(output, json.dumps(report, indent=1) + "\n")
    sys.stdout.flush()
    return 1 if failed else 0
