#!/usr/bin/env bash
# The CPU twin of the GPU machine's image: a venv with the image's Python minor, torch and triton, the oldest timm
# fdfast supports (pyproject.toml's floor) and fdfast itself; then, under it, the interpreter tests, the sm_90
# compile report and bench/gpu_check.sh's dry run. One command:
#
#   bash bench/device_env.sh [--all-tests] [--no-report]
#
# DEVICE_TWIN_VENV (default ~/.cache/fdfast/device-twin) is the venv, made or brought to the pinned versions
# (a few GB of wheels on the first run); DEVICE_TWIN_OUT (default: beside the venv) gets the logs, the JUnit XML
# and the dry run's $OUT. The compile report goes to bench/results/compile_report_triton-3.6.{txt,json}.
# --all-tests runs the whole default suite (slow: tens of minutes on 2 cores), not just the kernel area.
# Not in the default CI: the install alone takes minutes. Exit status: non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ALL_TESTS=0
REPORT=1
for arg in "$@"; do
  case $arg in
    --all-tests) ALL_TESTS=1 ;;
    --no-report) REPORT=0 ;;
    *) echo "usage: bash bench/device_env.sh [--all-tests] [--no-report]" >&2; exit 2 ;;
  esac
done
# The GPU image (see the device notes): Python 3.12, torch 2.11.0 (+cu130), torchvision 0.26.0, triton 3.6.0.
TORCH=2.11.0
TORCHVISION=0.26.0
TRITON=3.6.0
TIMM=$(sed -n 's/^ *"timm>=\([0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
# Triton 3.6's interpreter converts one-element arrays with int(), which numpy >= 2.4 refuses ("only 0-dimensional
# arrays can be converted"): every interpreted kernel test fails. The GPU image's numpy is newer, but it runs the
# compiled kernels, never the interpreter, so only the twin pins it.
NUMPY="numpy<2.4"
VENV=${DEVICE_TWIN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fdfast/device-twin}
OUT=${DEVICE_TWIN_OUT:-$(dirname "$VENV")/device-twin-results}
mkdir -p "$OUT"
PY="$VENV/bin/python"
declare -a ROWS
FAILED=0

stage() {  # stage NAME CMD...: output to $OUT/NAME.log, a row with rc and seconds
  local name=$1 t0=$SECONDS
  shift
  echo "device_env: $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  ROWS+=("$name|$rc|$(( SECONDS - t0 ))")
  [ $rc = 0 ] || FAILED=1
  tail -n 3 "$OUT/$name.log"
  return $rc
}

pinned() {  # the venv already holds the pinned versions and this tree's fdfast (editable)
  "$PY" - "$TORCH" "$TRITON" "$TIMM" "$ROOT" <<'EOF' > /dev/null 2>&1
import os, sys, numpy, timm, torch, triton
import fdfast.kernels
want_torch, want_triton, want_timm, root = sys.argv[1:5]
ok = (torch.__version__.split("+")[0] == want_torch and triton.__version__ == want_triton
      and timm.__version__ == want_timm and tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4)
      and os.path.samefile(os.path.dirname(fdfast.kernels.__file__), os.path.join(root, "kernels")))
sys.exit(0 if ok else 1)
EOF
}

install() {
  local python
  python=$(command -v python3.12 || command -v python3)
  [ -x "$PY" ] || "$python" -m venv "$VENV" || return 1
  "$PY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION" "triton==$TRITON" "timm==$TIMM" "$NUMPY" \
    safetensors pyyaml tqdm pillow pytest matplotlib tensorboard || return 1
  # no pytest-timeout: the image may lack it, and gpu_check's path without it is the one this proves
  "$PY" -m pip install -q --no-deps -e "$ROOT"
}

pinned || stage install install || { echo "device_env: the install failed (see $OUT/install.log)"; exit 1; }
"$PY" -c "import sys, torch, triton, timm, numpy; print('twin: python', sys.version.split()[0], 'torch',
      torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__)" \
  | tee "$OUT/versions.txt"

KERNEL_TESTS="tests/test_fd_loss_kernel.py tests/test_fd_loss_reference.py tests/test_rpb_attention.py
  tests/test_cpu_linear.py tests/test_gpu_launch.py tests/test_compile_report.py tests/test_gpu_check.py
  tests/test_patch_model.py tests/test_student.py tests/test_swinv2.py"
TESTS=$([ $ALL_TESTS = 1 ] && echo tests || echo $KERNEL_TESTS)
stage tests env TRITON_INTERPRET=1 "$PY" -m pytest -q -rfE --junitxml="$OUT/tests.xml" $TESTS
[ $REPORT = 1 ] && stage compile_report "$PY" bench/compile_report.py --dtypes bf16,fp32
stage dry_run env OUT="$OUT/dry_run" PYTHON="$PY" bash bench/gpu_check.sh --dry-run

printf '%-16s %4s %8s\n' stage rc seconds | tee "$OUT/summary.txt"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name rc secs <<< "$row"
  printf '%-16s %4s %8s\n' "$name" "$rc" "$secs" | tee -a "$OUT/summary.txt"
done
echo "device_env: logs in $OUT"
exit $FAILED
