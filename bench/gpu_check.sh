#!/usr/bin/env bash
# One GPU window, one script: the GPU tests, the sm_90 compile report on the device, the quick bench suites,
# the memory planner's check.
#
#   bash bench/gpu_check.sh [--dry-run]          (results and logs go to $OUT, default ./gpu_check_out)
#
# Works on a bare copy of the working tree: it uses the installed fdfast if there is one, else PYTHONPATH=.
# plus a shim (bench/_shim/sitecustomize.py) that maps fdfast.kernels onto ./kernels as setup.py does. It
# installs nothing from the network (the lent machine reaches nothing): a package that is missing is taken
# from $GPU_CHECK_WHEELS (a folder of wheels carried with the tree, pip --no-index --no-deps) or reported.
# Every step has a timeout inside a total budget ($GPU_CHECK_BUDGET_S, default 470 s = 7 min 50 s), so the
# whole check fits a 540 s command. --dry-run walks the same steps on a CPU machine, prints what it would run
# and writes the same files (marked dry-run) into $OUT; it exits 0 when the steps are well-formed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "gpu_check: $*" | tee -a "$OUT/gpu_check.log"; }

# ---- 1. environment: what the machine has, what is missing, how fdfast imports ---------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
  $PY - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "timm", "safetensors", "pytest", "yaml", "PIL", "numpy"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"
missing=$(grep " MISSING " "$OUT/env.txt" | cut -d' ' -f1 | tr '\n' ' ')
if [ -n "$missing" ]; then
  if [ -n "${GPU_CHECK_WHEELS:-}" ] && [ -d "${GPU_CHECK_WHEELS}" ] && [ $DRY = 0 ]; then
    log "installing from $GPU_CHECK_WHEELS (no index, no deps): $missing"
    $PY -m pip install --no-index --no-deps --find-links "$GPU_CHECK_WHEELS" $missing >> "$OUT/pip.log" 2>&1 \
      || log "pip could not install some of: $missing (see pip.log)"
  else
    log "missing packages: $missing (set GPU_CHECK_WHEELS to a folder of wheels to install them offline)"
  fi
fi
if ! $PY -c "import fdfast.kernels" > /dev/null 2>&1; then
  export PYTHONPATH="$ROOT:$ROOT/bench/_shim${PYTHONPATH:+:$PYTHONPATH}"
  log "fdfast is not installed: PYTHONPATH=. with the fdfast.kernels shim"
fi
if [ $DRY = 0 ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { log "no CUDA device visible to torch: run with --dry-run on a CPU machine"; exit 2; }
fi

# ---- run one step within what is left of the budget --------------------------------------------------------
declare -a STEP_ROWS
step() {  # step NAME MAX_SECONDS CMD...: logs to $OUT/NAME.log, records rc and seconds
  local name=$1 max=$2
  shift 2
  local left=$(( BUDGET - SECONDS ))
  local limit=$(( max < left ? max : left ))
  if [ $limit -lt 15 ]; then
    STEP_ROWS+=("$name|skipped (budget)|0")
    log "$name: skipped, ${left}s of the budget left"
    return
  fi
  log "$name (<= ${limit}s): $*"
  if [ $DRY = 1 ]; then  # the step is well-formed when every file it names exists
    local arg bad=""
    for arg in "$@"; do
      case $arg in *.py) [ -f "$arg" ] || bad="$bad $arg" ;; esac
    done
    echo "dry-run: $*${bad:+ (missing:$bad)}" > "$OUT/$name.log"
    STEP_ROWS+=("$name|$([ -z "$bad" ] && echo dry-run || echo "rc=1 missing$bad")|0")
    return
  fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STEP_ROWS+=("$name|rc=$rc$([ $rc = 124 ] && echo ' (timeout)')|$(( SECONDS - t0 ))")
  tail -n 3 "$OUT/$name.log"
}

# ---- 2. the GPU tests (the kernels compile for the device: conftest sets no interpreter with CUDA) --------
step gpu_tests 170 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --junitxml="$OUT/gpu_tests.xml" \
  tests/test_fd_loss_kernel.py tests/test_rpb_attention.py tests/test_patch_model.py tests/test_data.py
# ---- 3. the sm_90 compile report, on the device's own Triton (bf16, the training dtype) -----------------
step compile_report 70 $PY bench/compile_report.py --out "$OUT" --dtypes bf16 --head-dims 32,64,128
# ---- 4. the quick bench suites, rows into $OUT --------------------------------------------------------------
step bench_loss 55 $PY bench/run.py --suite loss --device cuda --quick --results "$OUT"
step bench_attention 75 $PY bench/run.py --suite attention --device cuda --quick --results "$OUT"
step bench_e2e 55 $PY bench/run.py --suite e2e --device cuda --quick --results "$OUT"
# ---- 5. the memory planner against the device (helper script of issue 15) --------------------------------
step plan_check 40 $PY bench/plan_check.py --quick --out "$OUT"

# ---- 6. the short table ---------------------------------------------------------------------------------
{
  printf '%-16s %-22s %6s\n' step result seconds
  for row in "${STEP_ROWS[@]}"; do
    IFS='|' read -r name result secs <<< "$row"
    printf '%-16s %-22s %6s\n' "$name" "$result" "$secs"
  done
  grep -hE '[0-9]+ (passed|failed|error)' "$OUT/gpu_tests.log" 2>/dev/null | tail -n 1 | sed 's/^/tests: /'
  [ -f "$OUT/compile_report.txt" ] && echo "compile report: $(tail -n 1 "$OUT/compile_report.txt")"
  $PY bench/summarize.py "$OUT" 2>/dev/null || true
  echo "total ${SECONDS}s of ${BUDGET}s; files in $OUT"
} | tee "$SUMMARY"
failed=$(printf '%s\n' "${STEP_ROWS[@]}" | grep -c "rc=[1-9]")
exit $(( failed > 0 ? 1 : 0 ))
