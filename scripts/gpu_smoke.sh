#!/usr/bin/env bash
# The GPU checks BENCHMARKS.md "GPU" asks for, in one run on one CUDA device (random-weight
# models built from configs: nothing is downloaded). Writes its results under DIR (default
# gpu-results/). Run where calibft and its dependencies are importable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
status=0
python3 -m calibft doctor --device cuda --output "$out/doctor.json" 2>&1 | tee "$out/doctor.txt"
status=$((status | PIPESTATUS[0]))
python3 scripts/measure_plan.py --device cuda --dtype bfloat16 2>&1 | tee "$out/measure_plan.txt"
status=$((status | PIPESTATUS[0]))
python3 benches/bench_generate.py --device cuda --random-weights \
    --output "$out/bench_generate-cuda.json" 2>&1 | tee "$out/bench_generate.txt"
status=$((status | PIPESTATUS[0]))
exit "$status"
