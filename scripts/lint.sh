#!/usr/bin/env bash
# Static gates, the way to check a change before committing: Python formatting, lint and types,
# Rust formatting and lint. Needs the .venv that scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check python tests benches scripts
.venv/bin/ruff check python tests benches scripts
.venv/bin/mypy
cargo fmt --check
cargo clippy --quiet --all-targets --features python -- -D warnings
echo "static gates passed"
