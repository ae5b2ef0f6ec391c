#!/usr/bin/env bash
# One prepared GPU check (installs nothing): the GPU-marked tests, then every benchmark suite on CUDA.
# Usage on a CUDA machine with fdfast installed:  bash bench/gpu_check.sh  [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest -q -m gpu tests/test_fd_loss_kernel.py tests/test_rpb_attention.py tests/test_patch_model.py tests/test_data.py
tests_rc=$?
python bench/run.py --suite all --device cuda "$@"
bench_rc=$?
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc (rows appended to bench/results/*.jsonl)"
exit $(( tests_rc || bench_rc ))
