#!/usr/bin/env bash
# The prepared GPU check: everything that matters on a GPU, in one script that finishes within
# about 8 minutes on one H100/H200. Run it from the repository root first thing whenever a GPU
# machine is lent, and commit what it wrote under benchmarks/results/gpu/ with the command.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps, tiny, on this CPU (the test suite)
#
# The GPU machine has PyTorch and most of mimkit's needs preinstalled and no network: mimkit runs
# from the checkout (PYTHONPATH=src), and the few packages it lacks travel as wheels in .whl/
# (made here by `bash benchmarks/gpu_wheels.sh`; installed with --no-index). Fashion-MNIST travels
# in .data/fashion-mnist/ (or MIMKIT_FMNIST_ROOT); without it the real-data run uses synthetic images.
#
# Steps (each writes its own file; a failed step is recorded and the next one still runs):
#   env.txt            torch, CUDA, the GPU, mimkit
#   gpu_tests.log      pytest -m gpu: bf16/fp16/fp32 steps, fused AdamW, fused vs explicit
#                      attention, torch.compile, pinned-memory loading, exact resume (deterministic)
#   bench_*.md|json    mimkit bench --compare in bf16: MAE ViT-B and ViT-L, BEiT ViT-B at realistic
#                      batches (images/s, MFU against the measured bf16 matmul peak, Hugging Face
#                      side by side); targets on H100/H200: MAE ViT-L >= 50% MFU, >= 1.3x HF
#   fmnist_run.log     a short real MAE pretraining on Fashion-MNIST with its data pipeline, and
#   bench_fmnist.md    the same recipe's model step beside its DataLoader alone (does it keep up?)
#   summary.md         the figures above in one page
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[ "${1:-}" = "--cpu-smoke" ] && MODE=cpu
if [ "$MODE" = gpu ]; then
  RES=${GPU_CHECK_OUT:-benchmarks/results/gpu}
else
  RES=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check_smoke.XXXXXX)}
fi
mkdir -p "$RES"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$MODE" = cpu ] && PY=.venv/bin/python
STATUS="$RES/status.txt"
: > "$STATUS"

# ---- mimkit from the checkout, nothing downloaded ----
SITE=/tmp/mimkit-gpu-site
if ! "$PY" -c 'import omegaconf, webdataset, braceexpand' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || echo "wheels: install failed" >> "$STATUS"
  else
    echo "wheels: omegaconf/webdataset missing and no .whl/ (bash benchmarks/gpu_wheels.sh)" >> "$STATUS"
  fi
fi
export PYTHONPATH="$PWD/src:$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
MIMKIT=("$PY" -m mimkit.cli)

step() {  # step NAME COMMAND...: run, time, record the exit status; never stop the script
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  "$@"
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" >> "$STATUS"
  return 0
}

# what the steps import: a missing one is said here, not discovered mid-run
step preflight "$PY" -c '
import importlib, sys
need = ["torch", "timm", "safetensors", "omegaconf", "webdataset", "braceexpand", "pycocotools",
        "tensorboard", "torchmetrics", "transformers", "pytest", "matplotlib", "yaml", "tqdm"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("missing:", "; ".join(missing) if missing else "none")
sys.exit(1 if missing else 0)
' > "$RES/preflight.txt" 2>&1
cat "$RES/preflight.txt"

step env "$PY" - > "$RES/env.txt" 2>&1 <<'EOF'
import platform, torch, mimkit
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("mimkit", mimkit.__version__, "from", mimkit.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm {p.major}.{p.minor}",
          "bf16", torch.cuda.is_bf16_supported())
else:
    print("gpu none (CPU:", platform.processor() or platform.machine(), ")")
EOF
cat "$RES/env.txt"

# ---- the gpu-marked tests (on CPU they are skipped: the smoke checks they are collected) ----
step gpu_tests "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  -o addopts="" -rs > "$RES/gpu_tests.log" 2>&1
tail -3 "$RES/gpu_tests.log"

# ---- mimkit bench --compare: the paper models in bf16 ----
if [ "$MODE" = gpu ]; then
  BENCHES=("mae_vit_base_in1k 256" "mae_vit_large_in1k 128" "beit_vit_base_in1k 128")
  BENCH_ARGS=(--steps 10 --warmup 5 --rounds 3 --data-batches 0)
  SIZE=()
else  # the same commands on a model a CPU steps through in seconds
  BENCHES=("mae_vit_base_in1k 2" "beit_vit_base_in1k 2")
  BENCH_ARGS=(--steps 1 --warmup 1 --rounds 1 --data-batches 0 --matmul-size 256)
  SIZE=(model.depth=1 model.decoder.depth=1 model.img_size=32 mask.num_masked=2)
fi
for item in "${BENCHES[@]}"; do
  read -r recipe batch <<< "$item"
  step "bench_$recipe" "${MIMKIT[@]}" bench -c "configs/pretrain/$recipe.yaml" --compare \
    --precision bf16 --batch-size "$batch" "${BENCH_ARGS[@]}" --json "$RES/bench_$recipe.json" \
    data.name=synthetic ${SIZE[@]+"${SIZE[@]}"} > "$RES/bench_$recipe.md" 2>&1
  tail -12 "$RES/bench_$recipe.md"
done

# ---- a short real pretraining on Fashion-MNIST, with its data pipeline ----
FMNIST=${MIMKIT_FMNIST_ROOT:-}
for d in "$FMNIST" .data/fashion-mnist /usr/share/datasets/fashion-mnist; do
  if [ -n "$d" ] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then FMNIST=$d; break; fi
done
if [ -n "$FMNIST" ] && ls "$FMNIST"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  DATA=("data.root=$FMNIST")
else
  DATA=(data.name=synthetic data.synthetic_size=2048 model.in_chans=3)
  echo "fmnist: not found, synthetic images instead" >> "$STATUS"
fi
if [ "$MODE" = gpu ]; then
  RUN=(train.epochs=2 train.batch_size=512 data.num_workers=12 eval.knn.train_samples=10000)
  FB=(--batch-size 512 --steps 20 --warmup 5 --rounds 3 --data-batches 100)
else
  RUN=(train.max_steps=3 train.batch_size=16 data.num_workers=1 eval.knn.enabled=false
       data.max_samples=256 model.depth=1 run.device=cpu)
  FB=(--batch-size 16 --steps 1 --warmup 1 --rounds 1 --data-batches 2 --matmul-size 256)
  DATA+=(data.max_samples=256 model.depth=1)
fi
RUN_DIR=$(mktemp -d /tmp/gpu_check_fmnist.XXXXXX)
step fmnist_run "${MIMKIT[@]}" pretrain -c configs/pretrain/mae_vit_tiny_fmnist.yaml \
  "run.dir=$RUN_DIR/run" "${DATA[@]}" "${RUN[@]}" > "$RES/fmnist_run.log" 2>&1
tail -8 "$RES/fmnist_run.log"
cp "$RUN_DIR/run/metrics.jsonl" "$RES/fmnist_metrics.jsonl" 2>/dev/null
step bench_fmnist "${MIMKIT[@]}" bench -c configs/pretrain/mae_vit_tiny_fmnist.yaml \
  --precision bf16 "${FB[@]}" --json "$RES/bench_fmnist.json" "${DATA[@]}" \
  > "$RES/bench_fmnist.md" 2>&1
tail -6 "$RES/bench_fmnist.md"

# ---- summary ----
{
  echo "# GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh${1:+ $1}\`"
  echo
  echo '```'
  cat "$RES/env.txt"
  echo '```'
  echo
  echo "## Steps"
  echo
  echo '```'
  cat "$STATUS"
  echo '```'
  echo
  echo "## gpu tests"
  echo
  echo '```'
  tail -15 "$RES/gpu_tests.log"
  echo '```'
  for f in "$RES"/bench_*.md; do
    echo
    echo "## $(basename "$f" .md)"
    echo
    grep -v '^wrote ' "$f"
  done
  echo
  echo "## Fashion-MNIST run"
  echo
  echo '```'
  grep -E '^(mimkit:|pretrain:|step |  )' "$RES/fmnist_run.log" | tail -20
  echo '```'
} > "$RES/summary.md"
echo "gpu_check: wrote $RES (summary.md)"
if grep -q "rc=[1-9]" "$STATUS"; then
  echo "gpu_check: some steps failed:" && grep "rc=[1-9]" "$STATUS"
  exit 1
fi
