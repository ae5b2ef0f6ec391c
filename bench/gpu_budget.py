"""Time budget of bench/gpu_check.sh's steps on a cold GPU machine, from the Triton compiles they will trigger.

    python3 bench/gpu_budget.py [--json FILE] [--limit-s 420]

Counting without a GPU: each step's kernel work (the GPU tests' cases, the quick benches' shapes) runs through
fdfast's real host code on *fake* CUDA tensors (``FakeTensorMode``: shapes, dtypes and strides, no memory),
with ``kernels.utils.launch`` replaced by a recorder. A recorded launch gives the kernel, its constexprs, the
autotuner's candidates (pruned by the kernel's own prune function, called as the installed Triton calls it)
and the argument specialisation the installed Triton derives (integers equal to 1 or divisible by 16, aligned
pointers). Distinct (kernel, specialisation, constexprs, config, warps, stages) are the binaries a cold Triton
cache compiles; a new autotune key also benchmarks each candidate.

Pricing: seconds per compile = the mean ``compile_s`` of the committed compile report of the installed
Triton's minor version (bench/results/compile_report_triton-X.Y.json, measured on a 2-core CPU machine: a
cautious figure for the GPU machine's CPUs), plus fixed costs per step (process start and imports, the
benches' timed loops) that are estimates until a GPU run measures them. The step limits gpu_check.sh uses are
these estimates times a margin.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

import fdfast.kernels.fd_loss as fd  # noqa: E402
import fdfast.kernels.rpb_attention as rpb  # noqa: E402
from fdfast.kernels import utils  # noqa: E402

SM_COUNT = 132  # H100 SXM / H200: the batch-chunk count of the dbias reduction depends on it
SECONDS_PER_COMPILE_DEFAULT = 2.0  # when no compile report of this Triton exists
AUTOTUNE_BENCH_S = 0.15  # do_bench per candidate: 25 ms warm-up + 100 ms of repeats, plus launch overhead
START_S = 8  # python3 start, import torch + triton (+ timm for the tests), CUDA context
MARGIN = 1.5  # a step's limit: estimate x margin (first runs on an unmeasured machine)


# ------------------------------------------------------------------------------------------------ recording
class _Ctx:
    """The parts of an autograd context the kernels' forward / backward use."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _forward_backward(function):
    """``function.apply`` for fake tensors: forward, then backward with a ones-like gradient (the autograd
    engine cannot run a backward on fake CUDA tensors, so both are called directly)."""
    def apply(*args):
        needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ctx = _Ctx(needs)
        out = function.forward(ctx, *args)
        if any(needs) and hasattr(ctx, "saved_tensors"):
            function.backward(ctx, torch.ones_like(out))
        return out.detach()
    return apply


# Triton's names of the pointer element types fdfast passes
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64"}


def _arg_spec(arg):
    """How the installed Triton specialises one runtime argument: (type, "D" when divisible by 16 / 16-byte
    aligned), or ("constexpr", 1) for an integer 1. Tensors by hand (fake tensors have no data pointer: an
    allocation is aligned, a view by its offset); everything else by Triton's own specialiser."""
    if isinstance(arg, torch.Tensor):
        aligned = (arg.storage_offset() * arg.element_size()) % 16 == 0
        return "*" + TRITON_TYPES[arg.dtype], "D" if aligned else ""
    return tuple(native_specialize_impl(BaseBackend, arg, False, True, True))


def _name(kernel) -> str:
    fn = kernel
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", str(fn))


class Recorder:
    """Replaces ``launch``: keeps every distinct compile a launch would trigger, runs nothing.

    ``compiles``: compile key -> what compiling it needs (kernel name, jit function, the runtime arguments and
    their specialisation, constexprs, warps, stages) and ``label``, the workload that first met it."""

    def __init__(self):
        self.compiles: dict = {}
        self.tunes: dict = {}  # (kernel, autotune key) -> number of candidates it benchmarks
        self.calls: list = []  # (kernel, args, meta, device) of every launch, in order
        self.label = None

    @property
    def launches(self) -> int:
        return len(self.calls)

    def __call__(self, kernel, grid, args, meta, device):
        self.calls.append((kernel, args, meta, device))
        specs = tuple(_arg_spec(a) for a in args)
        flags = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        if isinstance(kernel, Autotuner):
            jit, configs = kernel.fn, self.pruned(kernel, args, meta)
            if len(configs) > 1:
                self.tunes.setdefault((_name(kernel), self.tune_key(kernel, args, meta)), len(configs))
            chosen = [(dict(flags, **c.kwargs), c.num_warps, c.num_stages) for c in configs]
        else:
            jit, chosen = kernel, [(flags, meta.get("num_warps", 4), meta.get("num_stages", 3))]
        for consts, warps, stages in chosen:
            key = (_name(kernel), specs, tuple(sorted((k, str(v)) for k, v in consts.items())), warps, stages)
            self.compiles.setdefault(key, dict(name=_name(kernel), jit=jit, args=args, specs=specs, consts=consts,
                                               num_warps=warps, num_stages=stages, label=self.label))

    @staticmethod
    def pruned(tuner, args, meta) -> list:
        """The candidates the installed Triton would benchmark: its own ``prune_configs``, with ``nargs`` set
        as ``Autotuner.run`` sets it."""
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            return tuner.prune_configs(meta)
        finally:
            tuner.nargs = None

    @staticmethod
    def tune_key(tuner, args, meta) -> tuple:
        """The autotuner's cache key as ``Autotuner.run`` builds it (named key values, then tensor dtypes)."""
        named = {**dict(zip(tuner.arg_names, args)), **meta}
        named = {k: v for k, v in named.items() if k in tuner.arg_names}
        key = [named[k] for k in tuner.keys if k in named]
        return tuple(key + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


@contextlib.contextmanager
def fake_cuda(recorder: Recorder):
    """Fake CUDA tensors and a recording ``launch`` in both kernel modules (undone on the way out)."""
    saved = [(fd, "launch", fd.launch), (rpb, "launch", rpb.launch), (utils, "_sm_count", utils._sm_count),
             (fd._FDLossTriton, "apply", fd._FDLossTriton.apply),
             (rpb._RPBAttentionTriton, "apply", rpb._RPBAttentionTriton.apply)]
    fd.launch = rpb.launch = recorder
    utils._sm_count = lambda index: SM_COUNT
    fd._FDLossTriton.apply = _forward_backward(fd._FDLossTriton)
    rpb._RPBAttentionTriton.apply = _forward_backward(rpb._RPBAttentionTriton)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


# ------------------------------------------------------------------------------------------------ workloads
def fd_loss_call(B, N, CS, CT, dtype, teacher_dtype=None, kind="smooth_l1", autocast=False, bias=True,
                 device="cuda"):
    """One forward + backward of ``fd_loss(backend="triton")`` as training calls it."""
    S = torch.empty(B, N, CS, device=device, dtype=dtype, requires_grad=True)
    T = torch.empty(B, N, CT, device=device, dtype=teacher_dtype or dtype)
    W = torch.empty(CT, CS, device=device, dtype=dtype, requires_grad=True)
    b = torch.empty(CT, device=device, dtype=dtype, requires_grad=True) if bias else None
    if autocast:  # what fd_loss does under bf16 autocast (torch.autocast("cuda") switches itself off without CUDA)
        S, W, b = (None if t is None else t.to(torch.bfloat16) for t in (S, W, b))
    fd.fd_loss(S, T, W, b, backend="triton", kind=kind)


def attention_call(B, H, N, D, W, dtype, bias=True, bias_grad=True, backward=True, bias_dtype=None, device="cuda"):
    """One forward (+ backward) of ``rpb_attention(backend="triton")``."""
    q, k, v = (torch.empty(B, H, N, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    table = torch.empty(H, N, N, device=device, dtype=bias_dtype or dtype, requires_grad=bias_grad) if bias else None
    mask = torch.empty(W, N, N, device=device, dtype=dtype) if W else None
    rpb.rpb_attention(q, k, v, table, mask, backend="triton")


@functools.lru_cache(maxsize=None)
def _test_module(name: str):
    """A test module, for its GPU case tables (tests/ is not a package: loaded by path, no test runs). Loaded
    before any fake tensor mode is entered (``budget`` preloads them)."""
    import importlib.util
    tests = str(ROOT / "tests")
    sys.path.insert(0, tests)  # the modules import their helpers_* siblings
    try:
        spec = importlib.util.spec_from_file_location(f"_gpu_cases_{name}", ROOT / "tests" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(tests)
    return module


def _gpu_test_work(core: bool):
    """The kernel launches of ``pytest -m gpu`` on tests/test_fd_loss_kernel.py and tests/test_rpb_attention.py,
    core cases (-k "not extra") or the extras (their cases are tables there; the tests call these entry points)."""
    fd_tests, attn_tests = _test_module("test_fd_loss_kernel"), _test_module("test_rpb_attention")
    for (B, N, CS, CT), dtype in fd_tests.FD_GPU_CASES if core else fd_tests.FD_GPU_EXTRA_CASES:
        fd_loss_call(B, N, CS, CT, dtype)
    for shape, dtype in attn_tests.ATTN_GPU_CASES if core else attn_tests.ATTN_GPU_EXTRA_CASES:
        attention_call(*shape, dtype)
    if core:
        for kind in ("smooth_l1", "l2"):  # test_gpu_autocast_bf16_uses_bf16_operands: bf16 teacher tokens
            fd_loss_call(*fd_tests.FD_GPU_AUTOCAST_SHAPE, torch.float32, torch.bfloat16, kind=kind, autocast=True)
        for shape, dtype in attn_tests.ATTN_GPU_FORWARD_CASES:
            attention_call(*shape, dtype, bias_grad=False, backward=False)
        # tests/test_patch_model.py's GPU test: tiny BEiT (17 tokens) and SwinV2 (4 x 4 windows, head dim 8)
        # forwards under bf16 autocast, their bias tables fp32 (the plain ViT has no bias: SDPA)
        attention_call(4, 2, 17, 16, 0, torch.bfloat16, bias_dtype=torch.float32, bias_grad=False, backward=False)
        attention_call(16, 2, 16, 8, 4, torch.bfloat16, bias_dtype=torch.float32, bias_grad=False, backward=False)


def bench_loss_work():
    from bench.suites import loss
    for B, N, CS, CT in loss.cuda_shapes(quick=True).values():
        fd_loss_call(B, N, CS, CT, torch.float32, teacher_dtype=loss.TEACHER_DTYPE, autocast=True)


def bench_attention_work():
    from bench.suites import attention
    for _, B, H, N, D, W in attention.shapes("cuda", quick=True):
        attention_call(B, H, N, D, W, torch.bfloat16)
    for B, H, N, D in attention.BIAS_COST_SHAPES["cuda"]:
        attention_call(B, H, N, D, 0, torch.bfloat16, bias=False, bias_grad=False, backward=False)  # no bias
        attention_call(B, H, N, D, 0, torch.bfloat16, bias_grad=False)  # dq without STORE_DBIAS


def bench_e2e_work():
    """The quick e2e step's kernels: the ViT-B student's attention (batch 128, a learned bias) and the loss."""
    attention_call(128, 12, 197, 64, 0, torch.bfloat16, bias_dtype=torch.float32)
    fd_loss_call(128, 197, 768, 768, torch.float32, torch.bfloat16, autocast=True)


def nothing():
    """A step without Triton launches (plan_check --quick: ATen paths only)."""


# gpu_check.sh's steps in order -> (their kernel work, seconds of work besides compiling: the tests' and
# benches' own run time, an estimate until a GPU run measures it). Steps share Triton's disk cache. OPTIONAL
# steps run only in the time the others leave: they are not in the estimate.
STEPS = {
    "gpu_tests": (lambda: _gpu_test_work(core=True), 40),
    "bench_loss": (bench_loss_work, 25),
    "bench_attention": (bench_attention_work, 35),
    "bench_e2e": (bench_e2e_work, 45),
    "plan_check": (nothing, 35),
    "compile_report": (None, 0),
    "gpu_tests_extra": (lambda: _gpu_test_work(core=False), 10),
}
OPTIONAL = {"gpu_tests_extra"}


# ------------------------------------------------------------------------------------------------ pricing
def seconds_per_compile(version: str = triton.__version__) -> tuple[float, str]:
    """Mean seconds per compiled config in the committed report of this Triton minor version."""
    minor = ".".join(version.split(".")[:2])
    path = ROOT / "bench" / "results" / f"compile_report_triton-{minor}.json"
    if not path.exists():
        return SECONDS_PER_COMPILE_DEFAULT, f"default (no {path.name})"
    rows = [r["compile_s"] for r in json.loads(path.read_text())["configs"] if r.get("compile_s")]
    return statistics.fmean(rows), path.name


def budget(steps=None) -> dict:
    """Per step, in order: new compiles (a binary an earlier step compiled is in Triton's disk cache), autotune
    keys met (benchmarked again in each process), and the estimate and limit in seconds."""
    per_compile, source = seconds_per_compile()
    rows, cached = {}, set()
    _test_module("test_fd_loss_kernel"), _test_module("test_rpb_attention")
    for name, (work, run_s) in (steps or STEPS).items():
        rec = Recorder()
        if name == "compile_report":  # compiles by itself, outside Triton's cache: every config counts
            work_compiles = compile_report_work_count()
        else:
            with fake_cuda(rec):
                work()
            work_compiles = len(set(rec.compiles) - cached)
            cached |= set(rec.compiles)
        tune_s = sum(rec.tunes.values()) * AUTOTUNE_BENCH_S
        estimate = START_S + work_compiles * per_compile + tune_s + run_s
        rows[name] = dict(compiles=work_compiles, launches=rec.launches, autotune_keys=len(rec.tunes),
                          autotune_candidates=sum(rec.tunes.values()),
                          kernels=sorted({c["name"] for c in rec.compiles.values()}),
                          estimate_s=round(estimate), limit_s=round(estimate * MARGIN))
    total = sum(r["estimate_s"] for name, r in rows.items() if name not in OPTIONAL)
    return dict(triton=triton.__version__, torch=torch.__version__, seconds_per_compile=round(per_compile, 2),
                seconds_per_compile_from=source, estimate_s=total, steps=rows)


def compile_report_work_count() -> int:
    from bench.compile_report import collect
    return len(collect({"bf16": torch.bfloat16}, one_per_kernel=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the budget as JSON here")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    args = ap.parse_args(argv)
    wanted = args.steps.split(",")
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        print(f"gpu_budget: unknown steps {unknown}; choose from {list(STEPS)}", file=sys.stderr)
        return 2
    result = budget({s: STEPS[s] for s in wanted})
    for name, r in result["steps"].items():
        print(f"{name:<16} {r['compiles']:4d} compiles {r['autotune_keys']:3d} autotune keys "
              f"({r['autotune_candidates']:3d} candidates)  ~{r['estimate_s']:4d} s  limit {r['limit_s']:4d} s")
    print(f"estimate {result['estimate_s']} s in all (without {', '.join(sorted(OPTIONAL))}: only in the "
          f"time left); {result['seconds_per_compile']} s per compile "
          f"({result['seconds_per_compile_from']}), triton {result['triton']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
