#!/usr/bin/env bash
# MFU, fp16 and bf16, ZeRO-0/2 and ddp of GPT-2 124M and 350M through bigopt on one NVIDIA GPU
# (BENCHMARKS.md section 2; benchmarks/gpu_breakdown.py splits a step's time by phase).
#
#   bash benchmarks/gpu.sh             # one GPU: install, then 4 runs (~5-8 minutes)
#   SMOKE=1 bash benchmarks/gpu.sh     # CPU smoke test of the logic: gpt-1m, bf16, 5 steps
#   DRY_RUN=1 bash benchmarks/gpu.sh   # validate the 4 specs only (no Ray, no install)
#
# Install: a venv (.venv-gpu, --system-site-packages so an image's own CUDA torch is reused);
# `pip install torch` (a CUDA build from PyPI) only when torch cannot see a GPU; then
# `pip install -e .`. Offline: WHEELS=/dir/of/wheels installs from there (--no-index).
# Knobs: MATRIX=model:precision:zero[:probe],... (gpu.py's --matrix; zero 'ddp' = strategy ddp)
# STEPS=60 BATCH=16 PYTHON=python3.
# Results: a table on stdout, runs/benchmarks-gpu/gpu-results-*.{md,json} (and $OUT if set).
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
if [[ "${SMOKE:-0}" == 1 || "${DRY_RUN:-0}" == 1 ]]; then
  # Use the environment at hand (e.g. the repo's CPU .venv): nothing is installed.
  PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
  [[ "${SMOKE:-0}" == 1 ]] && args+=(--smoke)
  [[ "${DRY_RUN:-0}" == 1 ]] && args+=(--dry-run)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
  VENV="${VENV:-.venv-gpu}"
  [[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  pip_install() {
    if [[ -n "${WHEELS:-}" ]]; then
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
    else
      "$PY" -m pip install -q "$@"
    fi
  }
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "installing a CUDA build of torch"
    pip_install "torch>=2.4,<2.15"   # the Linux x86-64 wheel on PyPI is the CUDA build
  fi
  "$PY" -c 'import bigopt, deepspeed, ray' 2>/dev/null || pip_install -e .
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name())'
  args+=(--steps "${STEPS:-60}" --batch "${BATCH:-16}")
  [[ -n "${MATRIX:-}" ]] && args+=(--matrix "$MATRIX")
fi

export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu.py "${args[@]}"
