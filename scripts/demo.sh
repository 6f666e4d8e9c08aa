#!/usr/bin/env bash
# The demo: set up .venv, make sure Fashion-MNIST is there, pretrain MAE (ViT-Tiny width) on it on
# the CPU, evaluate with k-NN against the same encoder at random init, and say where things are.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

FMNIST=${MIMKIT_FMNIST_ROOT:-/usr/share/datasets/fashion-mnist}
have_fmnist() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$FMNIST/$f" ] || [ -f "$FMNIST/$f.gz" ] || return 1
  done
}
if ! have_fmnist && [ -z "${MIMKIT_FMNIST_ROOT:-}" ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"; }
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "demo: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || true
  fi
fi
if ! have_fmnist; then
  echo "demo: Fashion-MNIST not found in $FMNIST. Install it with 'sudo apt-get install" \
    "dataset-fashion-mnist', or set MIMKIT_FMNIST_ROOT to a folder holding train-images-idx3-ubyte," \
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be .gz)." >&2
  exit 1
fi

RUN_DIR=${MIMKIT_RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
.venv/bin/mimkit pretrain -c configs/pretrain/mae_vit_tiny_fmnist.yaml \
  "data.root=$FMNIST" "run.dir=$RUN_DIR" "$@"
echo "demo: done. Figures: $RUN_DIR/figures/, metrics: $RUN_DIR/metrics.jsonl and $RUN_DIR/eval.json"
