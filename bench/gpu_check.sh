#!/usr/bin/env bash
# One GPU window, one command: the GPU tests, the quick benches, the memory planner's check and the device's own
# sm_90 compile of every kernel, inside a budget sized from the Triton compiles each step triggers.
#
#   bash bench/gpu_check.sh              on the GPU machine (its own python3, torch, triton: nothing installed
#                                        but carried wheels, see --prepare); results: $OUT (default ./gpu_check_out)
#   bash bench/gpu_check.sh --prepare    here, before the GPU call: wheels the image may lack or hold too old
#                                        (timm at fdfast's floor, pytest-timeout) into ./.whl (git-ignored);
#                                        the call then names .whl in `carry`
#   bash bench/gpu_check.sh --dry-run    on a CPU machine (the CPU twin of the GPU image, bench/device_env.sh,
#                                        or the default venv): proves every step works and FAILS if anything is
#                                        missing (collects the GPU tests, compiles one config of every kernel for
#                                        sm_90 with the installed Triton, runs plan_check and each bench --quick
#                                        on the CPU path, checks the archive against the 8-file limit)
#
# $OUT ends up holding two files: summary.txt and gpu_check.tar.gz (every log, the JUnit XML, the bench rows, the
# autotune choices, the budget, the compile report), re-packed after each step so a run cut short still returns
# what it did. The budget: bench/gpu_budget.py counts the compiles each step triggers on a cold Triton cache and
# prices them; its estimate is printed before anything starts, and each step runs under its limit, cut to what
# is left of $GPU_CHECK_BUDGET_S (default 420 s: the whole check in 7 minutes). Extra GPU test cases run last,
# only in the time left. Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_WHEELS
# (default ./.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --prepare]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
# the floors pyproject.toml states, read there (one source)
floor() { sed -n "s/^ *\"$1>=\([0-9.]*\).*/\1/p" "$ROOT/pyproject.toml" | head -n 1; }

if [ $MODE = prepare ]; then  # pure-Python wheels for the GPU image (Python 3.12, no index there)
  mkdir -p "$WHEELS"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$WHEELS" "timm==$(floor timm)" "pytest-timeout>=2.2" || exit 1
  ls -l "$WHEELS"
  echo "gpu_check: carry .whl with the call: run(command='bash bench/gpu_check.sh', carry=['.whl'])"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-420}  # the GPU window's: the estimate must fit it
STEPS_BUDGET=$BUDGET
[ $MODE = dry ] && STEPS_BUDGET=3600  # the dry run's steps run on the CPU, far slower than on the GPU
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # packed into $OUT/gpu_check.tar.gz after every step
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
export TRITON_PRINT_AUTOTUNING=1  # each autotune choice (key, config, time) lands in the step's log
declare -a STEP_ROWS
FAILED=0

log() { echo "gpu_check: $*" | tee -a "$WORK/gpu_check.log"; }
stop() { log "$*"; pack; exit 2; }

pack() {  # $OUT holds summary.txt + one archive; written to a temporary name first, then renamed
  tar -czf "$OUT/.gpu_check.tar.gz" -C "$WORK" . && mv "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
}

# ---- 1. the environment: versions against fdfast's floors; stop at once without CUDA, torch or triton -------
$PY - "$MODE" "$(floor torch)" "$(floor triton)" "$(floor timm)" > "$WORK/env.txt" 2>&1 <<'EOF'
import importlib, sys
mode, floors = sys.argv[1], dict(zip(("torch", "triton", "timm"), sys.argv[2:5]))
def version(v):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())
print("python", sys.version.split()[0], sys.executable)
status = {}
for name in ("torch", "triton", "timm", "pytest", "pytest_timeout", "safetensors", "yaml", "PIL", "numpy"):
    try:
        v = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
        status[name] = "missing"
        continue
    old = name in floors and floors[name] and version(v) < version(floors[name])
    status[name] = "old" if old else "ok"
    print(name, v, f"OLD (fdfast needs >= {floors[name]})" if old else "")
if status.get("torch") == "ok":
    import torch
    cuda = torch.cuda.is_available()
    print("cuda", cuda, torch.version.cuda, torch.cuda.get_device_name() if cuda else "")
    status["cuda"] = "ok" if cuda else "missing"
print("STATUS", " ".join(f"{k}={v}" for k, v in status.items()))
EOF
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$WORK/env.txt" 2>&1
else
  echo "nvidia-smi: none" >> "$WORK/env.txt"
fi
cat "$WORK/env.txt"
STATUS=$(sed -n 's/^STATUS //p' "$WORK/env.txt")
has() { [[ " $STATUS " == *" $1=$2 "* ]]; }
has torch ok || stop "torch is missing or below its floor: nothing can run ($PY; see env.txt)"
has triton ok || stop "triton is missing or below its floor: the kernels cannot compile"
[ $MODE = run ] && ! has cuda ok && stop "no CUDA device visible to torch: on a CPU machine use --dry-run"
for pkg in timm pytest_timeout; do  # carried wheels (--prepare) for what the image lacks or has too old
  if ! has $pkg ok; then
    wheel=$(ls "$WHEELS"/${pkg//_/?}-*.whl 2>/dev/null | head -n 1)
    if [ $MODE = run ] && [ -n "$wheel" ]; then
      $PY -m pip install -q --no-index --no-deps --target "$WORK/site" "$wheel" >> "$WORK/pip.log" 2>&1 \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" && log "$pkg: installed $(basename "$wheel")"
    else
      log "$pkg is $(echo " $STATUS " | sed -n "s/.* $pkg=\([a-z]*\) .*/\1/p") and no wheel in $WHEELS"
    fi
  fi
done
$PY -c "import timm" > /dev/null 2>&1 || stop "timm is missing: the tests' conftest imports it (run --prepare here)"
[ $MODE = dry ] && ! has timm ok && { log "dry run: timm is below fdfast's floor $(floor timm)"; FAILED=1; }
if ! $PY -c "import fdfast.kernels" > /dev/null 2>&1; then  # a bare tree: map fdfast.kernels onto ./kernels
  export PYTHONPATH="$ROOT:$ROOT/bench/_shim${PYTHONPATH:+:$PYTHONPATH}"
  log "fdfast is not installed: PYTHONPATH=. with the fdfast.kernels shim"
fi
$PY -c "import fdfast.kernels.fd_loss, fdfast.kernels.rpb_attention" 2>> "$WORK/env.txt" \
  || stop "fdfast's kernels do not import (see env.txt)"
TIMEOUT_OPT=""
if $PY -c "import pytest_timeout" > /dev/null 2>&1; then
  TIMEOUT_OPT="--timeout=150"  # one test: its cold compiles (ViT-B attention: ~18 configs) and its checks
else
  log "pytest-timeout is missing: no per-test timeout (each step still stops at its own limit)"
fi

# ---- 2. the budget: compiles per step, counted on fake CUDA tensors, priced by the compile report -------------
$PY bench/gpu_budget.py --json "$WORK/budget.json" > "$WORK/budget.log" 2>&1 \
  || stop "bench/gpu_budget.py failed: $(tail -n 3 "$WORK/budget.log")"
cat "$WORK/budget.log"
ESTIMATE=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['estimate_s'])" "$WORK/budget.json")
limit_of() {  # a step's limit in the budget
  $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['steps'][sys.argv[2]]['limit_s'])" "$WORK/budget.json" "$1"
}
log "estimate: ${ESTIMATE} s ($(( ESTIMATE / 60 )) min $(( ESTIMATE % 60 )) s) of a ${BUDGET} s budget;" \
  "extra tests only in the time left"
if [ "$ESTIMATE" -gt "$BUDGET" ]; then
  log "the estimate is over the budget: steps are cut to what is left"
  [ $MODE = dry ] && FAILED=1
fi

# ---- one step: its log in $WORK, its limit min(budget's, what is left), its row in the summary ---------------
step() {  # step NAME LIMIT_S CMD...
  local name=$1 max=$2
  shift 2
  local left=$(( STEPS_BUDGET - SECONDS - 10 ))  # 10 s kept for the summary and the archive
  local limit=$(( max < left ? max : left ))
  if [ $limit -lt 15 ]; then
    STEP_ROWS+=("$name|skipped (budget)|0|$max")
    log "$name: skipped, ${left}s of the budget left"
    return
  fi
  log "$name (<= ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  STEP_ROWS+=("$name|rc=$rc$([ $rc = 124 ] && echo ' (timeout)')|$(( SECONDS - t0 ))|$max")
  [ $rc = 0 ] || FAILED=1
  tail -n 2 "$WORK/$name.log"
  pack
}

TESTS="tests/test_fd_loss_kernel.py tests/test_rpb_attention.py tests/test_patch_model.py tests/test_data.py"
PYTEST="$PY -m pytest -p no:cacheprovider -o addopts= -m gpu"
if [ $MODE = run ]; then
  # ---- 3. GPU tests first: the training dtypes and shapes, one fp32 case per kernel ---------------------------
  step gpu_tests "$(limit_of gpu_tests)" $PYTEST -rA $TIMEOUT_OPT -k "not extra" --junitxml="$WORK/gpu_tests.xml" $TESTS
  # ---- 4. the quick benches (rows, autotune choices into $WORK), the planner against the device -------------
  step bench_loss "$(limit_of bench_loss)" $PY bench/run.py --suite loss --device cuda --quick --results "$WORK"
  step bench_attention "$(limit_of bench_attention)" \
    $PY bench/run.py --suite attention --device cuda --quick --results "$WORK"
  step bench_e2e "$(limit_of bench_e2e)" $PY bench/run.py --suite e2e --device cuda --quick --results "$WORK"
  step plan_check "$(limit_of plan_check)" $PY bench/plan_check.py --quick --out "$WORK"
  # ---- 5. the device's own Triton: one bf16 config of every kernel (rows written as they compile) ------------
  step compile_report "$(limit_of compile_report)" \
    $PY bench/compile_report.py --out "$WORK" --dtypes bf16 --one-per-kernel
  # ---- 6. the extra GPU cases (awkward shapes, fp16) in whatever time is left -------------------------------
  step gpu_tests_extra "$(limit_of gpu_tests_extra)" \
    $PYTEST -rA $TIMEOUT_OPT -k extra --junitxml="$WORK/gpu_tests_extra.xml" $TESTS
else
  # ---- dry run: every step's code on the CPU; any failure fails the run -------------------------------------
  step gpu_tests_collect 120 $PYTEST --collect-only -q -k "not extra" $TESTS
  step gpu_tests_extra_collect 120 $PYTEST --collect-only -q -k extra $TESTS
  step compile_report 240 $PY bench/compile_report.py --out "$WORK" --dtypes bf16 --one-per-kernel
  step plan_check 240 $PY bench/plan_check.py --dry-run --out "$WORK"
  step bench_loss 600 $PY bench/run.py --suite loss --device cpu --quick --results "$WORK"
  step bench_attention 600 \
    env TRITON_INTERPRET=1 $PY bench/run.py --suite attention --device cpu --quick --results "$WORK"
  # e2e --quick on the CPU builds and compiles five providers, each in its own process: the longest step (it
  # did not finish in 1500 s on 2 cores under a load of 8-10)
  step bench_e2e 2700 $PY bench/run.py --suite e2e --device cpu --quick --results "$WORK"
  for name in gpu_tests_collect gpu_tests_extra_collect; do  # a collection that finds nothing proves nothing
    grep -qE "^[1-9][0-9]*(/[0-9]+)? tests? collected" "$WORK/$name.log" \
      || { log "$name: no GPU test collected"; FAILED=1; }
  done
  kernels=$($PY -c "import json,sys; print(len({r['kernel'] for r in json.load(open(sys.argv[1]))['configs']}))" \
    "$WORK"/compile_report_triton-*.json 2>/dev/null || echo 0)
  [ "$kernels" -ge 8 ] || { log "compile_report: $kernels kernels compiled for sm_90, want 8"; FAILED=1; }
fi

# ---- 7. the summary ($OUT/summary.txt) and the archive ($OUT/gpu_check.tar.gz) -------------------------------
summarize() {
  printf '%-24s %-18s %7s %7s\n' step result seconds limit
  for row in "${STEP_ROWS[@]}"; do
    IFS='|' read -r name result secs max <<< "$row"
    printf '%-24s %-18s %7s %7s\n' "$name" "$result" "$secs" "$max"
  done
  for log_name in gpu_tests gpu_tests_extra; do
    grep -hE '^=+ .*[0-9]+ (passed|failed|error)' "$WORK/$log_name.log" 2>/dev/null | tail -n 1 | sed "s/^/$log_name: /"
    grep -hE '^(FAILED|ERROR) ' "$WORK/$log_name.log" 2>/dev/null | head -n 12
  done
  for f in "$WORK"/compile_report_triton-*.txt; do [ -f "$f" ] && echo "compile report: $(tail -n 1 "$f")"; done
  [ -f "$WORK/attention_autotune.json" ] && echo "autotune choices: $($PY -c \
    "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$WORK/attention_autotune.json") keys" \
    "(attention_autotune.json; each choice's timings: TRITON_PRINT_AUTOTUNING lines in the step logs)"
  $PY bench/summarize.py "$WORK" 2>/dev/null || true
  echo "estimate ${ESTIMATE}s; total ${SECONDS}s of ${STEPS_BUDGET}s;" \
    "$(basename "$OUT")/gpu_check.tar.gz holds the logs and rows"
}
summarize | tee "$OUT/summary.txt"
pack
if [ $MODE = dry ]; then  # what comes back from the GPU machine: at most 8 files, 16 MiB each, 2 folders deep
  $PY - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt" || FAILED=1
import re, sys, tarfile
from pathlib import Path
out = Path(sys.argv[1])
files = [p for p in out.rglob("*") if p.is_file()]
bad = [str(p) for p in files if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name) or len(p.relative_to(out).parts) > 3
       or p.stat().st_size > 16 * 2**20]
members = tarfile.open(out / "gpu_check.tar.gz").getnames()
print(f"archive: {len(files)} files in $OUT ({', '.join(sorted(p.name for p in files))}), "
      f"{len(members)} entries in gpu_check.tar.gz")
ok = len(files) <= 8 and not bad and {"./env.txt", "./budget.json", "./gpu_check.log"} <= set(members)
print("archive layout: " + ("ok (<= 8 files)" if ok else f"NOT ok: {bad or len(files)}"))
sys.exit(0 if ok else 1)
EOF
fi
exit $FAILED
