#!/usr/bin/env bash
# The one prepared run for a GPU machine: the CUDA tests (`pytest -m gpu`) and the benchmarks,
# every result (logs, JSON, summary.txt) written into OUT, in at most 8 minutes.
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--only STEP,...] OUT
#   bash scripts/gpu_check.sh --rehearse [--wheels DIR] [--only STEP,...] OUT
#
# --wheels DIR  install DALI and any missing dependency offline from DIR's wheel files into
#               OUT/site (first on PYTHONPATH for every step), never into the system's Python
# --rehearse    every step on the CPU, same entry points and flags, tiny sizes, DALI CPU-only,
#               in about 2 minutes on 2 cores; CUDA-only calls are listed as "GPU only". Without
#               --wheels it installs a one-module wheel built on the spot, through the same path
# --only        run only these steps (e.g. --only compile,compile-tests to rerun them)
# Python is ${PYTHON:-python3}. OUT must be new, empty, or an earlier gpu_check's OUT.
#
# Steps, in order. Estimates for one H100/H200 with 16 cores, written before any GPU run, to be
# compared with the first real one (summary.txt prints each step's time beside them). A step stops
# at its limit, a failing step does not stop the next, and every step also stops at the deadline
# (475 s after the start), so the whole check ends within 8 minutes.
#   step           est.   limit  what
#   install         40 s   90 s  (--wheels) pip install --no-index --no-deps --target OUT/site
#   preflight       15 s   40 s  versions, nvidia-smi; DALI imports, sees the GPU, decodes with nvJPEG
#   data            10 s   40 s  2,000 generated ImageNet-sized JPEGs (16 processes); the sample's
#                                stand-in when ../shared/imagenet-sample is missing
#   tests           70 s  120 s  pytest -m "gpu and not compile": CUDA paths, DALI on the GPU
#   train           60 s   90 s  eager, batch 128 and 256: DALI loader vs synthetic vs baseline
#   loader          35 s   60 s  dali (copy), dali (zero-copy), torch loader; 8 workers/threads
#   model           30 s   50 s  eager, bf16, channels_last, batch 128 and 256
#   overhead        15 s   30 s  trainer vs bare loop, batch 128
#   validate        20 s   40 s  evaluation img/s, DALI and torch loaders, batch 256, fp32
#   checkpoint      10 s   25 s  atomic save vs torch.save of a cspresnext50 state
#   compile        120 s  170 s  train at batch 128: torch.compile default and reduce-overhead (CUDA
#                                graphs), cold compiler caches; `warm-up s` is the compile time
#   compile-tests   40 s   80 s  pytest -m "gpu and compile"
#   total          465 s
# Rehearsal (CPU): cspresnext_tiny at 32 px, batch 4 (and 8), 16 JPEGs, 2 workers, 2 steps, one
# round, `--device cpu`, compile with `--compile-backend aot_eager` and mode default only.
set -u
usage="usage: bash scripts/gpu_check.sh [--rehearse] [--wheels DIR] [--only STEP,...] OUT"
REHEARSE=0 WHEELS="" ONLY="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1; shift ;;
    --wheels) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; WHEELS=$(realpath -m "$2"); shift 2 ;;
    --only) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one OUT folder only; $usage" >&2; exit 2; }
       OUT=$(realpath -m "$1"); shift ;;
  esac
done
[ -n "$OUT" ] || { echo "$usage" >&2; exit 2; }
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "gpu_check: --wheels $WHEELS is not a folder" >&2; exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# no bytecode beside the sources: Python reads the caches installed packages have, writes none
export PYTHONDONTWRITEBYTECODE=1
$PY -m cspx.bench.check claim "$OUT" || exit 2

# everything a step writes goes under OUT: temp files, caches, compiled kernels
export TMPDIR="$OUT/tmp" CSPX_CACHE="$OUT/cache" \
  TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache" TRITON_CACHE_DIR="$OUT/triton-cache" \
  CUDA_CACHE_PATH="$OUT/cuda-cache" PYTHONUNBUFFERED=1 PIP_NO_INPUT=1
# ...except where OUT's path is long: the DataLoader's workers pass batches over Unix sockets
# that multiprocessing makes in TMPDIR (TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX, 32 characters
# more), and Linux takes at most 107 characters for such a path ("AF_UNIX path too long"); the
# temp folder then is a short one of gpu_check's own, removed when it ends
if [ ${#TMPDIR} -gt 70 ]; then
  TMPDIR=$(mktemp -d /tmp/cspx-gpu-check.XXXXXX) || exit 1
  trap 'rm -rf "$TMPDIR"' EXIT
fi
mkdir -p "$TMPDIR"
rm -f "$OUT/summary.txt"  # this run's summary (the folder is gpu_check's own: see claim)
status=0
started=$(date +%s)

if [ "$REHEARSE" = 1 ]; then
  MODE=rehearse DEV=cpu DEADLINE=300
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared 2-core machine: no spinning threads
  SIZE="--model cspresnext_tiny --img-size 32" B1=4 BS=4,8 VB=4 N=16 W=2
  STEPS=2 ROUNDS=1 WARM=1 LWARM=1 CMODES=default BACKEND=aot_eager
else
  MODE=gpu DEV=cuda DEADLINE=475
  SIZE="--model cspresnext50 --img-size 224" B1=128 BS=128,256 VB=256 N=2000 W=8
  STEPS=20 ROUNDS=3 WARM=3 LWARM=8 CMODES=default,reduce-overhead BACKEND=inductor
fi

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

step() {  # step NAME ESTIMATE LIMIT COMMAND...: run it with a time limit, log it, summarise it
  local name=$1 est=$2 limit=$3; shift 3
  wanted "$name" || return 0
  local left=$(( DEADLINE - ($(date +%s) - started) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    say "$(printf '%-14s %-8s %5s  est %3ss  not run: the %s s budget is spent' "$name" "NOT RUN" "" "$est" "$DEADLINE")"
    status=1; return 0
  fi
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? word=ok
  [ "$rc" -ne 0 ] && word=FAILED
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && word=TIMEOUT
  [ "$rc" -eq 0 ] || status=1
  say "$(printf '%-14s %-8s %4ss  est %3ss  limit %3ss  rc=%s  %s' "$name" "$word" \
    "$(( $(date +%s) - t0 ))" "$est" "$limit" "$rc" "$*")"
  [ "$rc" -eq 0 ] || tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  return 0
}

tests_result() {  # the test step's junit: a failure, or on a GPU a skip, fails the check
  wanted "$1" && [ -f "$OUT/$1.xml" ] || return 0
  $PY -m cspx.bench.check junit "$OUT/$1.xml" "$MODE" 2>&1 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

say "gpu_check $MODE $(date -u '+%Y-%m-%d %H:%M:%S UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) python $PY"
if [ "$MODE" = gpu ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); --rehearse runs the same steps on the CPU"
  exit 2
fi

# ----- install, preflight ---------------------------------------------------------------------
# OUT/site (the wheels) first, then this checkout: a bare checkout copied to a GPU machine has
# no installed cspx, and scripts/*.py import it from here
export PYTHONPATH="$OUT/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS="nvidia.dali nvidia.dali.plugin.pytorch"
if [ -n "$WHEELS" ]; then
  step install 40 90 $PY -m cspx.bench.check wheels "$WHEELS" "$OUT/site"
elif [ "$MODE" = rehearse ]; then  # the same install path, with a wheel made here
  step install 40 90 bash -c "$PY -m cspx.bench.check probe-wheel '$OUT/wheels-probe' && $PY -m cspx.bench.check wheels '$OUT/wheels-probe' '$OUT/site'"
  IMPORTS="nvidia.cspx_rehearsal_probe $IMPORTS"
fi
{ date -u; [ "$MODE" = gpu ] && nvidia-smi; } >"$OUT/environment.txt" 2>&1
step preflight 15 40 $PY -m cspx.bench.check preflight $DEV "$OUT/environment.txt" $IMPORTS
DALI=1
if wanted preflight; then
  tail -n 1 "$OUT/preflight.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  grep -q "^DALI ok" "$OUT/preflight.log" || DALI=0
fi
if [ "$DALI" = 1 ]; then
  LOADER=dali LOADERS=dali-copy,dali-zerocopy,torch VLOADERS=dali,torch
else  # every non-DALI step still runs; the DALI steps measure the torch loader, under their names
  say "DALI unavailable: the DALI steps run with the torch loader only (see preflight.log)"
  LOADER=torch LOADERS=torch VLOADERS=torch
fi

# ----- data, tests ------------------------------------------------------------------------------
SAMPLE=$(realpath -m "${CSPX_SAMPLE_DIR:-../shared/imagenet-sample}")
if [ -d "$SAMPLE/val" ]; then
  say "sample: $SAMPLE"
  step data 10 40 $PY -m cspx.bench.check data "$OUT/jpegs" $N
else
  step data 10 40 $PY -m cspx.bench.check data "$OUT/jpegs" $N "$OUT/sample"
  SAMPLE="$OUT/sample"
  say "sample: $SAMPLE (generated stand-in: the ImageNet sample is missing)"
fi
export CSPX_SAMPLE_DIR="$SAMPLE"
# the test files that hold GPU tests (collecting the whole suite costs a rehearsal 10 s a step)
GPU_FILES=$(grep -l "mark\.gpu" tests/test_*.py | tr '\n' ' ')
PYTEST="$PY -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors ${GPU_FILES:-tests}"
step tests 70 120 $PYTEST -m "gpu and not compile" --basetemp="$OUT/pytest-tmp" --junitxml="$OUT/tests.xml"
tests_result tests

# ----- benchmarks (each rewrites its JSON after every row) ---------------------------------------
B="$PY scripts/benchmark.py"
CL="--device $DEV $SIZE --workers $W --rounds $ROUNDS"  # common flags; the loader's warm-up is its own
C="$CL --warmup $WARM"
D="--data $OUT/jpegs"
step train 60 90 $B train $D --loader $LOADER --batch-sizes $BS --compile-modes eager \
  --steps $STEPS $C --json "$OUT/train.json"
step loader 35 60 $B loader $D --loaders $LOADERS --batch $B1 --steps $STEPS $CL --warmup $LWARM \
  --json "$OUT/loader.json"
step model 30 50 $B model --batch-sizes $BS --precisions bf16 --channels-last-grid on \
  --compile-modes eager --steps $STEPS $C --json "$OUT/model.json"
step overhead 15 30 $B overhead --batch $B1 --steps $STEPS $C --json "$OUT/overhead.json"
step validate 20 40 $B validate $D --loaders $VLOADERS --batch $VB $C --json "$OUT/validate.json"
step checkpoint 10 25 $B checkpoint $C --json "$OUT/checkpoint.json"

# ----- torch.compile, on its own after everything else --------------------------------------------
step compile 120 170 $B train $D --loader $LOADER --batch-sizes $B1 --compile-modes $CMODES \
  --compile-backend $BACKEND --no-baseline --steps $STEPS $C --json "$OUT/compile.json"
step compile-tests 40 80 $PYTEST -m "gpu and compile" --basetemp="$OUT/pytest-tmp-compile" \
  --junitxml="$OUT/compile-tests.xml"
tests_result compile-tests

say "results (every row of the JSON files; warm-up s of a compiled row is its compile time):"
$PY -m cspx.bench.check digest "$OUT"/{train,compile,model,loader,overhead,validate,checkpoint}.json \
  2>&1 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
if [ "$MODE" = rehearse ]; then
  say "GPU only (left out of this rehearsal, besides the GPU tests listed above):"
  say "  nvidia-smi in environment.txt"
  say "  DALI on the GPU: the preflight decodes with DALI's CPU decoder, not nvJPEG"
  say "  torch.compile mode reduce-overhead (CUDA graphs): the compile step runs mode default only"
  say "  inductor's GPU kernels: the compile step uses --compile-backend aot_eager (traced and differentiated, no code generated)"
  say "  peak memory per row (torch.cuda.max_memory_allocated): the CPU reports the process's peak RSS"
  say "  pinned host memory and non_blocking copies (the baseline's DataLoader pins only for CUDA)"
fi
say "total $(( $(date +%s) - started )) s (deadline $DEADLINE s); status $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
