"""`calibft eval` under real launchers on CPU: 2 ranks through torchrun (and accelerate launch)
give the records of 1 process, and after a rank is killed a rerun completes the same records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_models import free_port, torchrun

# 18 prompts x 6 samples: enough work per rank for a kill to land mid-run.
ARGS = [
    "structured",
    "--selection",
    "paper_selected",
    "--split",
    "ood",
    "--samples",
    "6",
    "--max-bins",
    "48",
    "--max-new-tokens",
    "4",
    "--no-plots",
    "--no-progress",
]
ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def sharded_eval(model_dir: Path, output: Path) -> list[str]:
    return torchrun(
        "-m",
        "calibft",
        "eval",
        *ARGS,
        "--model",
        str(model_dir),
        "--output",
        str(output),
    )


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(output: Path) -> dict[str, dict]:
    cache = output / "cache"
    return {str(p.relative_to(cache)): json.loads(p.read_text()) for p in cache.rglob("*.json")}


def report(output: Path) -> dict:
    return json.loads((output / "report.json").read_text())


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "calibft", "eval", *ARGS, "--model", str(model_dir), "--output",
         str(out)])  # fmt: skip
    return out


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(model_dir, single, tmp_path) -> None:
    out = tmp_path / "torchrun"
    run(sharded_eval(model_dir, out))
    assert records(out) == records(single)
    two, one = report(out), report(single)
    assert two["config"]["num_processes"] == 2 and one["config"]["num_processes"] == 1
    assert two["benchmarks"] == one["benchmarks"]


@pytest.mark.slow
def test_a_killed_rank_leaves_its_records_and_the_rerun_does_the_rest(
    model_dir, single, tmp_path
) -> None:
    """Rank 1 is stopped once it has cached a record, then killed: the launcher ends the run, no
    report is written, the finished records stay; the rerun computes only the missing ones."""
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        sharded_eval(model_dir, out),
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rank1 = None
    deadline = time.monotonic() + 300
    while rank1 is None and time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "1":
                    rank1 = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.05)
    assert rank1 is not None
    while not (out / "cache").is_dir() or len(records(out)) < 2:
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.01)
    rank1.send_signal(signal.SIGSTOP)  # freeze it mid-share, then kill it
    done = len(records(out))
    rank1.kill()
    assert launcher.wait(timeout=120) != 0
    assert not (out / "report.json").exists()
    total = len(records(single))
    assert 2 <= done <= len(records(out)) < total
    kept = records(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    run(sharded_eval(model_dir, out))
    assert records(out) == records(single)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # finished records not redone
    assert all(records(out)[k] == v for k, v in kept.items())
    assert report(out)["benchmarks"] == report(single)["benchmarks"]


@pytest.mark.slow
def test_two_ranks_under_accelerate_launch_equal_one_process(model_dir, single, tmp_path) -> None:
    out = tmp_path / "accelerate"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # --cpu takes accelerate's single-process (or mpirun) launcher; --multi_gpu its torchrun
        # launcher, whose ranks run on the CPU when no GPU is visible.
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "calibft",
        "eval",
        *ARGS,
        "--model",
        str(model_dir),
        "--output",
        str(out),
    ]
    run(cmd)
    assert records(out) == records(single)
    assert report(out)["config"]["num_processes"] == 2
    assert report(out)["benchmarks"] == report(single)["benchmarks"]
