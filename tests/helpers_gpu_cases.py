"""pytest params for the GPU test cases, which the kernel test modules keep as tables (bench/gpu_budget.py reads
the same tables to count the compiles a cold GPU machine spends on them)."""
from __future__ import annotations

import pytest


def gpu_params(core, extra=()):
    """Params of the core and extra ``(shape, dtype)`` cases, ids 'AxBx...-dtype'; extras' ids start 'extra-'
    (bench/gpu_check.sh runs ``-k "not extra"`` first and the extras only when the GPU window has time left)."""
    def case_id(shape, dtype, prefix=""):
        return prefix + "x".join(map(str, shape)) + "-" + str(dtype).split(".")[-1]
    return ([pytest.param(s, d, id=case_id(s, d)) for s, d in core]
            + [pytest.param(s, d, id=case_id(s, d, "extra-")) for s, d in extra])
