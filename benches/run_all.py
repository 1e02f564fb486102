"""Run every Python benchmark (benches/bench_*.py) and, in full mode, the criterion benches.

    python benches/run_all.py            # full: minutes to an hour; figures for BENCHMARKS.md
    python benches/run_all.py --quick    # smoke sizes, about a minute per bench

Each bench gets `--output benches/results/<bench>[-quick].json` (and `--quick`); the run goes on
past a failing bench and exits non-zero at the end, naming the failures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output  # noqa: E402

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent


def bench_scripts(only: list[str] | None) -> list[Path]:
    scripts = sorted(BENCHES.glob("bench_*.py"))
    if only:
        unknown = set(only) - {p.stem for p in scripts}
        if unknown:
            raise SystemExit(
                f"--only: no such bench {sorted(unknown)}; have {[p.stem for p in scripts]}"
            )
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def run(cmd: list[str], cwd: Path) -> bool:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    ok = subprocess.run(cmd, cwd=cwd).returncode == 0
    print(f"-> {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes; skips cargo bench")
    parser.add_argument("--only", nargs="+", metavar="BENCH", help="e.g. bench_w1 bench_data_path")
    parser.add_argument("--no-cargo", action="store_true", help="skip `cargo bench` in full mode")
    args = parser.parse_args()

    failed = []
    for script in bench_scripts(args.only):
        cmd = [
            sys.executable,
            str(script),
            "--output",
            str(default_output(script.stem, args.quick)),
        ]
        if not run(cmd + (["--quick"] if args.quick else []), ROOT):
            failed.append(script.stem)
    if not (args.quick or args.no_cargo or args.only):
        if not run(["cargo", "bench", "--bench", "trie"], ROOT):
            failed.append("cargo bench")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    print("\nall benchmarks done; results in benches/results/")


if __name__ == "__main__":
    main()
