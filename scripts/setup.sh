#!/usr/bin/env bash
# Create .venv at the repository root and install mimkit with its test and docs tools (idempotent:
# a stamp keyed on pyproject.toml skips the install when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "mimkit needs Python >= 3.10 (set PYTHON=/path/to/python3.X)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# PyTorch builds known to install on this project's machines (docs/getting-started.md, "Installation").
case "$(uname -m)" in
  aarch64|arm64) TORCH_DEFAULT="torch==2.9.1 torchvision==0.24.1" ;;
  *)             TORCH_DEFAULT="torch==2.14.1 torchvision==0.29.1" ;;
esac
TORCH_SPEC=${MIMKIT_TORCH_SPEC:-$TORCH_DEFAULT}

stamp=".venv/.mimkit-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import mimkit' 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
echo "setup: installing into .venv ($TORCH_SPEC, then mimkit[test,docs]); this takes a few minutes"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e ".[test,docs]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import mimkit, torch, timm; print(f"setup: mimkit {mimkit.__version__}, torch {torch.__version__}, timm {timm.__version__}")'
echo "$want" > "$stamp"
