#!/usr/bin/env bash
# Set up (if needed) and run hivegen's checks: lint, types, then the test suite on real local clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hivegen tests benchmarks scripts examples
.venv/bin/ruff format --check hivegen tests benchmarks scripts examples
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
