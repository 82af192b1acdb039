#!/usr/bin/env bash
# The GPU check, in one run of about 10 minutes on a machine with NVIDIA GPUs (driver >= 580 for
# the pip build of Horovod's kernels; see README "Running on GPUs"):
#   1. the GPU stack (bash install.sh --gpu; skipped when $VENV already has it),
#   2. the tests that exercise the GPU path (ops, model, mixed precision, bench, devices, 2 ranks),
#   3. the bench of the default model on one GPU at fp32, bf16 and bf16+XLA, then larger batches
#      per rank, then (with several GPUs) on all of them under horovodrun.
# Every figure goes to stdout and to $RESULTS (default gpu-check-results.txt).
#
#   bash scripts/gpu_check.sh                      everything
#   STEPS=10 BATCHES="128 1024" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RESULTS=${RESULTS:-gpu-check-results.txt}
STEPS=${STEPS:-20}
BATCHES=${BATCHES:-"128 512 2048"}
export TF_CPP_MIN_LOG_LEVEL=2
: > "$RESULTS"
say() { echo "$*" | tee -a "$RESULTS"; }
section() { say ""; say "== $* ($(date -u +%T))"; }

section "machine"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee -a "$RESULTS" \
  || { say "nvidia-smi failed: no usable NVIDIA driver here"; exit 1; }
gpus=$(nvidia-smi -L | wc -l)

section "install (bash install.sh --gpu)"
if ! "$VENV/bin/python" -c "import tensorflow as tf, horovod.tensorflow as h; assert tf.test.is_built_with_cuda() and h.nccl_built()" 2>/dev/null; then
  bash install.sh --gpu 2>&1 | grep -vE "^WARNING: Location" | tail -5 | tee -a "$RESULTS"
fi
"$VENV/bin/python" -c "import tensorflow as tf; print('TensorFlow sees', tf.config.list_physical_devices('GPU'))" 2>&1 \
  | tail -1 | tee -a "$RESULTS"

section "tests that use the GPU"
"$VENV/bin/python" -m pytest -q tests/test_ops.py tests/test_model.py tests/test_compute_plan.py tests/test_precision.py \
  tests/test_bench.py tests/test_devices.py tests/test_multiprocess.py 2>&1 | tail -15 | tee -a "$RESULTS"

bench() {  # bench LABEL NP ARGS...: one bench run, its figures kept
  local label=$1 np=$2; shift 2
  section "bench $label"
  if [ "$np" -eq 1 ]; then
    "$VENV/bin/python" -m lm1b_hvd.bench --steps "$STEPS" "$@" 2>&1
  else
    "$VENV/bin/horovodrun" -np "$np" "$VENV/bin/python" -m lm1b_hvd.bench --steps "$STEPS" "$@" 2>&1
  fi | grep -vE "<stderr>|^[0-9]{4}-[0-9]{2}-[0-9]{2} " | tee -a "$RESULTS"
}
bench "default fp32, 1 GPU" 1 --preset default
bench "default bf16, 1 GPU" 1 --preset default --hpconfig precision=bf16
bench "default bf16+XLA, 1 GPU" 1 --preset default --hpconfig precision=bf16,xla=true
for batch in $BATCHES; do
  [ "$batch" -eq 128 ] && continue
  bench "default bf16+XLA, batch $batch per rank, 1 GPU" 1 --preset default \
    --hpconfig "precision=bf16,xla=true,batch_size=$batch"
done
if [ "$gpus" -gt 1 ]; then
  bench "default bf16+XLA, $gpus GPUs" "$gpus" --preset default --hpconfig precision=bf16,xla=true
  bench "default bf16+XLA, $gpus GPUs, no exchange" "$gpus" --preset default \
    --hpconfig precision=bf16,xla=true --no_exchange
fi
section "done: figures in $RESULTS"
