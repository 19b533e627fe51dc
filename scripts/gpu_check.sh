#!/usr/bin/env bash
# The one prepared run for a GPU machine: the CUDA tests (`pytest -m gpu`) and the benchmarks,
# with every result (logs, JSON) written into OUT_DIR. Finishes in under 8 minutes.
#   bash scripts/gpu_check.sh OUT_DIR
# Each step has its own time limit, and a failing step does not stop the next one; the exit code
# is non-zero if any step failed. summary.txt lists each step's status and time.
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python}
status=0
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-4s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
  [ "$rc" -eq 0 ] || status=1
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)" | tee "$OUT/summary.txt"
  exit 2
fi
{ date -u; nvidia-smi; $PY -c "import cspx.runlog as r, json; print(json.dumps(r.versions(), indent=1))"; } \
  >"$OUT/environment.txt" 2>&1

# 1. the CUDA code paths: mixed DALI decode, fp16 GradScaler, channels_last, compile, no syncs
step tests 170 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/gpu-tests.xml"

# 2. benchmarks, each writing JSON, on 2,000 generated ImageNet-sized JPEGs (made once, in
#    parallel: the first step only creates them)
B="$PY scripts/benchmark.py"
N=2000
step data 45 $PY -c "from cspx.bench.common import make_jpegs; from cspx.data.index import cache_dir; import os; make_jpegs(os.path.join(cache_dir(), 'bench-jpegs-$N'), $N)"
step model 50 $B model --batch-sizes 128 --precisions bf16,fp16 --channels-last-grid both \
  --steps 20 --rounds 3 --json "$OUT/model.json"
step loader 40 $B loader --make-data $N --batch 128 --steps 15 --rounds 3 --json "$OUT/loader.json"
step train 70 $B train --make-data $N --batch 128 --steps 25 --rounds 3 --json "$OUT/train.json"
step overhead 30 $B overhead --batch 128 --steps 20 --rounds 3 --json "$OUT/overhead.json"
step checkpoint 25 $B checkpoint --rounds 3 --json "$OUT/checkpoint.json"
step validate 25 $B validate --make-data $N --batch 256 --rounds 2 --json "$OUT/validate.json"

echo "total $(( $(date +%s) - started )) s" | tee -a "$OUT/summary.txt"
exit $status
