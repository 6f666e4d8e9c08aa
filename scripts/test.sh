#!/usr/bin/env bash
# Set up .venv and run the checks: ruff (lint + format) and the pytest suite (CPU, seconds each;
# it includes the strict build of the documentation site, tests/test_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
