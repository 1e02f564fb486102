"""Shared helpers of the Python benchmarks: result files, machine description, tables, and running
one measurement in a fresh child process so that its peak resident memory is its own."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibft.files import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_output(name: str, quick: bool) -> Path:
    """benches/results/<name>.json, or <name>-quick.json for the quick (smoke) mode."""
    return RESULTS_DIR / f"{name}{'-quick' if quick else ''}.json"


def write_json(path: Path, data: Any) -> None:
    """Write atomically (calibft's own helper): readers never see half a file."""
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def _total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(*, with_gpu: bool = True) -> dict[str, Any]:
    """Cores, CPU model, memory, GPU (if any) and the load average: the context every figure needs.

    Call it when the measurements are done: the 1/5/15-minute load averages then cover the run and
    show how much other work shared the cores (the timings are only as clean as that load).
    `with_gpu=False` skips importing torch (a second of start-up) for benches that never use it."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": usable,
        "cpu_model": _cpu_model(),
        "memory_gib": _total_memory_gib(),
        "gpu": _gpu() if with_gpu else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1_5_15_min": load_average(),
    }


def run_child(args: Sequence[str]) -> tuple[dict[str, Any], float]:
    """Run `python <args>` whose stdout's last line is a JSON object; return (that object, the
    child's own peak RSS in MiB).

    The peak comes from wait4 on that very child: RUSAGE_CHILDREN would report the maximum over
    every child waited for so far, hiding a smaller configuration behind a larger earlier one."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise RuntimeError(
            f"child {' '.join(args)} failed with exit code {code}:\n{stderr[-4000:]}"
        )
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed no result:\n{stderr[-4000:]}")
    # ru_maxrss is in KiB on Linux.
    return json.loads(lines[-1]), usage.ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident memory now (MiB), from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows`; `columns` are (key, header) pairs; floats get 3 significant
    digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
