#!/usr/bin/env bash
# One-shot GPU measurement of bigopt on a machine with no network (run from the checkout root
# as `bash .gpu/run.sh`, with $OUT set). Steps end by $DEADLINE s (default 400), the summary ~10 s later.
# .gpu/ is made by prepare.sh. The project measured: .gpu/bigopt when it exists (prepare.sh
# --project DIR put a copy of DIR's HEAD there), else the checkout that holds .gpu/.
#
#   install  wheels from .gpu/whl into $SITE (/tmp/site), PYTHONPATH=$SITE:$PROJ
#   check    versions (torch, ray, deepspeed, nvidia-smi ...) and `import ray, deepspeed, pydantic, bigopt`
#   a.       plain_gpu.py: plain PyTorch, same GPT, eager + torch.compile     -> $OUT/plain.{json,log}
#   b.       bigopt's benchmarks/gpu.py (Ray Train + DeepSpeed ZeRO-0, bf16 + fp16)
#                                                                             -> $OUT/gpu.log, gpu-results.json
#   c.       ds_direct.py: same model + bigopt's DeepSpeed config, no Ray, z0/z2 x bf16/fp16
#                                                                             -> $OUT/ds_direct.{json,log}
#   d.       summary.py -> $OUT/summary.md ; progress -> $OUT/run.log (8 files in $OUT in all)
#
# Local logic test (CPU, no Ray): CPU_SMOKE=1 SKIP_INSTALL=1 PY=/path/to/venv/python OUT=/tmp/o bash .gpu/run.sh
set -u
T0=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # .gpu
if [[ -d $ROOT/bigopt ]]; then PROJ="$ROOT/bigopt"      # a copy made by prepare.sh --project DIR
else PROJ="$(dirname "$ROOT")"; fi                       # the checkout that holds .gpu/
export BIGOPT_DIR="$PROJ"                                # plain_gpu.py, ds_direct.py
WORK="${WORK:-/tmp/gpurun}"
SITE="${SITE:-/tmp/site}"
PY="${PY:-python3}"
DEADLINE="${DEADLINE:-480}"
RESERVE=20                                     # seconds kept for the summary
CPU_SMOKE="${CPU_SMOKE:-0}"
OUT="${OUT:-$WORK/out}"
rm -rf "$WORK"; mkdir -p "$WORK/bin" "$OUT"
LOG="$OUT/run.log"
exec > >(tee -a "$LOG") 2>&1

ts() { printf '[%s +%ss]' "$(date -u +%H:%M:%S)" "$((SECONDS - T0))"; }
say() { echo "$(ts) $*"; }
left() { echo $((DEADLINE - (SECONDS - T0) - RESERVE)); }
status() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$WORK/status.tsv"; }

# step NAME BUDGET LOGFILE CMD...: run CMD under `timeout`, its output to LOGFILE; rc in $?
step() {
  local name=$1 budget=$2 log=$3; shift 3
  local l; l=$(left)
  (( budget > l )) && budget=$l
  if (( budget < 10 )); then
    say "SKIP $name: only $l s left before the deadline"; status "$name" 99 0 "$budget"; return 99
  fi
  say "+ [$name] timeout ${budget}s $*   > $log"
  local s=$SECONDS rc
  timeout -k 5 "$budget" "$@" >> "$log" 2>&1
  rc=$?
  say "[$name] rc=$rc after $((SECONDS - s)) s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  tail -n 6 "$log" | cut -c1-300 | sed 's/^/    | /'
  status "$name" "$rc" "$((SECONDS - s))" "$budget"
  return $rc
}

cap_logs() {   # keep each log under ~2.2 MB: its head and its tail
  local f
  for f in "$OUT"/*.log; do
    [[ -f $f && $f != "$OUT/run.log" && $(stat -c %s "$f") -gt 2500000 ]] || continue
    { head -c 200000 "$f"; printf '\n\n[... cut by run.sh ...]\n\n'; tail -c 2000000 "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
  done
}

finish() {
  trap - EXIT
  cap_logs
  say "d. summary"
  timeout -k 2 15 "$PY" "$ROOT/summary.py" --out "$OUT" --work "$WORK" \
      --storage "$WORK/runs-gpu" --project "$PROJ" > "$WORK/summary.stdout" 2>&1 \
    || say "summary.py failed: $(tail -n 3 "$WORK/summary.stdout")"
  grep -E "^\|" "$OUT/summary.md" 2>/dev/null
  say "files in \$OUT:"; ls -la "$OUT"
  say "done in $((SECONDS - T0)) s"
  sleep 1   # let tee flush run.log
}
trap finish EXIT
trap 'say "caught a signal: stopping"; exit 143' TERM INT HUP

say "bigopt GPU measurement; ROOT=$ROOT PROJ=$PROJ OUT=$OUT WORK=$WORK SITE=$SITE PY=$PY DEADLINE=${DEADLINE}s"
[[ -f $ROOT/PREPARED ]] && sed 's/^/    /' "$ROOT/PREPARED"
[[ -f $PROJ/bigopt/__init__.py ]] || say "WARNING: no bigopt package in $PROJ"

# ------------------------------------------------------------------ environment
# Ray: loopback only, no usage stats, no OOM-killer (RAM here can start small and grow),
# object store may fall back to /tmp if /dev/shm is small, and is capped at 4 GB.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1 RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=4000000000
export RAY_memory_monitor_refresh_ms=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset PYTHONDONTWRITEBYTECODE   # --no-compile install: let the first import of ray cache its .pyc
# Ray 2.60 enables token auth for a new local cluster and writes ~/.ray/auth_token: HOME must
# be writable.
if ! ( mkdir -p "${HOME:-/nonexistent}/.ray" && touch "$HOME/.ray/.w" ) 2>/dev/null; then
  export HOME="$WORK/home"; mkdir -p "$HOME"; say "HOME not writable: HOME=$HOME"
fi
# gpu.py runs `lscpu`; bigopt's console script is not installed (nothing here pip-installs it).
command -v lscpu >/dev/null || { printf '#!/bin/sh\necho "Model name: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2)"\n' > "$WORK/bin/lscpu"; chmod +x "$WORK/bin/lscpu"; say "no lscpu: using a stand-in"; }
printf '#!/bin/sh\nexec "%s" -c "import sys; from bigopt.cli import main; sys.exit(main())" "$@"\n' "$PY" > "$WORK/bin/bigopt"
chmod +x "$WORK/bin/bigopt"
export PATH="$WORK/bin:$SITE/bin:$PATH"

{
  echo "host: $(uname -srm); nproc $(nproc); $(grep -m1 MemTotal /proc/meminfo); /dev/shm: $(df -h /dev/shm 2>/dev/null | tail -1)"
  echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
  echo "image's own packages (before our wheels):"
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as m
for n in ("torch", "triton", "numpy", "pandas", "pyarrow", "protobuf", "grpcio", "aiohttp", "yarl",
          "multidict", "typing_extensions", "attrs", "psutil", "packaging", "pydantic", "ray", "deepspeed"):
    try:
        print(f"  {n} {m.version(n)}")
    except m.PackageNotFoundError:
        print(f"  {n} -")
EOF
  command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nvidia-smi | head -n 20; }
  command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1
  command -v gcc >/dev/null && gcc --version | head -1
} > "$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt"

# ------------------------------------------------------------------ install
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  say "+ $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $ROOT/whl/*.whl"
  s=$SECONDS
  timeout -k 5 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/whl/*.whl > "$WORK/install.log" 2>&1
  rc=$?; status install "$rc" "$((SECONDS - s))" 150
  say "install rc=$rc in $((SECONDS - s)) s"; grep -v "^$" "$WORK/install.log" | tail -n 15
fi
export PYTHONPATH="$SITE:$PROJ${PYTHONPATH:+:$PYTHONPATH}"
say "PYTHONPATH=$PYTHONPATH"
cd "$PROJ" || exit 1

# ------------------------------------------------------------------ versions + import check
say "+ versions"
timeout -k 5 90 "$PY" - <<'EOF' 2>&1 | tee -a "$WORK/versions.txt"
import importlib, importlib.metadata as m, sys
print("after install:", sys.executable, sys.version.split()[0])
for n in ("torch", "ray", "deepspeed", "pydantic", "pydantic_core", "protobuf", "aiohttp", "jsonschema",
          "typing_extensions", "opentelemetry-sdk", "numpy", "pyarrow", "pandas"):
    try:
        print(f"  {n} {m.version(n)}")
    except m.PackageNotFoundError:
        print(f"  {n} MISSING")
import torch
print("  torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
say "+ $PY -c 'import ray, deepspeed, pydantic, bigopt'"
if timeout -k 5 120 "$PY" -c 'import ray, deepspeed, pydantic, bigopt; print("IMPORT OK: ray", ray.__version__, "deepspeed", deepspeed.__version__, "pydantic", pydantic.__version__, "bigopt", bigopt.__file__)' > "$WORK/import.log" 2>&1; then
  grep "IMPORT OK" "$WORK/import.log"; status import_check 0 - 120
else
  rc=$?
  echo "=================================================================="
  echo "IMPORT CHECK FAILED (rc=$rc): import ray, deepspeed, pydantic, bigopt"
  tail -n 25 "$WORK/import.log"
  echo "=================================================================="
  status import_check "$rc" - 120
fi
timeout -k 5 60 "$PY" -c 'import ray.train.torch, ray.data, bigopt.train.loop, bigopt.train.stage; from ray._private.utils import get_dashboard_dependency_error as e; print("deep imports OK; dashboard deps:", e() or "complete")' 2>&1 | tail -n 5

GPU_OK=0
"$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null && GPU_OK=1
if [[ $GPU_OK == 1 ]]; then
  export RAY_OVERRIDE_RESOURCES='{"GPU": 1}'   # in case Ray's NVML probe sees none
elif [[ $CPU_SMOKE != 1 ]]; then
  say "WARNING: torch sees no CUDA GPU"
fi
SMOKE=(); [[ $CPU_SMOKE == 1 ]] && SMOKE=(--cpu-smoke)

# ------------------------------------------------------------------ a. plain PyTorch
say "a. plain PyTorch baseline"
B=100
step plain_gpu "$B" "$OUT/plain.log" "$PY" "$ROOT/plain_gpu.py" --out "$OUT/plain.json" \
  --budget-s $((B - 20)) "${SMOKE[@]}"

# ------------------------------------------------------------------ b. bigopt + Ray
say "b. bigopt's benchmarks/gpu.py (Ray Train + DeepSpeed)"
mkdir -p "$WORK/gpu_out"
GPU_ARGS=(--steps 60 --batch 16)
[[ $CPU_SMOKE == 1 ]] && GPU_ARGS+=(--dry-run)   # no Ray here: validate the specs only
# gpu.py writes gpu-results.{md,json} into $OUT itself: point it at a scratch dir (8-file cap)
step bigopt_gpu_py 265 "$OUT/gpu.log" env OUT="$WORK/gpu_out" "$PY" benchmarks/gpu.py \
  "${GPU_ARGS[@]}" --storage "$WORK/runs-gpu"
B_RC=$?
cp "$WORK/gpu_out/gpu-results.json" "$OUT/" 2>/dev/null
if [[ $CPU_SMOKE != 1 ]]; then
  say "+ ray stop --force"
  timeout -k 2 10 "$PY" -m ray.scripts.scripts stop --force >> "$WORK/raystop.log" 2>&1
  {
    echo; echo "======== Ray session logs (tails), gpu.py rc=$B_RC ========"
    RL=/tmp/ray/session_latest/logs
    N=$([[ $B_RC == 0 ]] && echo 8 || echo 40)
    for f in raylet.out raylet.err gcs_server.err dashboard_agent.log runtime_env_agent.log \
             monitor.log; do
      [[ -f $RL/$f ]] && { echo "---- $f"; tail -n "$N" "$RL/$f"; }
    done
    if [[ $B_RC != 0 ]]; then
      for f in $(grep -l -E "Traceback|Error" "$RL"/worker-*.err "$RL"/python-core-worker-*.log 2>/dev/null | head -n 4); do
        echo "---- $f"; grep -E -A12 "Traceback|Error" "$f" | tail -n 40
      done
    fi
    echo "---- bigopt metrics.jsonl"
    for f in "$WORK"/runs-gpu/*/*/train/metrics.jsonl; do [[ -f $f ]] && { echo "$f"; cat "$f"; }; done
  } >> "$OUT/gpu.log" 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader | sed 's/^/    gpu process left: /'
fi
[[ $B_RC != 0 ]] && say "gpu.py failed (rc=$B_RC): c. runs the same model through DeepSpeed without Ray"

# ------------------------------------------------------------------ c. DeepSpeed without Ray
say "c. DeepSpeed direct (no Ray)"
L=$(left)
step ds_direct 120 "$OUT/ds_direct.log" env MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 RANK=0 \
  WORLD_SIZE=1 LOCAL_RANK=0 "$PY" "$ROOT/ds_direct.py" --out "$OUT/ds_direct.json" \
  --budget-s $(( (L < 120 ? L : 120) - 15 )) "${SMOKE[@]}"
exit 0   # finish() (the EXIT trap) writes summary.md
