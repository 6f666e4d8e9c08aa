#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine without network, here where pip
# works: wheels of the few mimkit dependencies its image lacks (.whl/, for its Python 3.12) and
# Fashion-MNIST (.data/fashion-mnist/). Both folders are git-ignored; name them in the device
# tool's `carry` (about 35 MB together).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLAT[@]}" -d .whl \
  "omegaconf==2.3.0" "webdataset>=1.0,<2" "braceexpand==0.1.7" "pycocotools>=2.0.7"
# antlr4 (omegaconf's parser runtime) is published as a source archive only: build its wheel here
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
ls -la .whl
FMNIST=${MIMKIT_FMNIST_ROOT:-/usr/share/datasets/fashion-mnist}
mkdir -p .data/fashion-mnist
cp "$FMNIST"/*-ubyte* .data/fashion-mnist/
du -sh .whl .data
