"""Launch helpers both fdfast kernels share: where Triton can run, dtypes, autocast, padding, SM counts.

One home for what ``fd_loss.py`` and ``rpb_attention.py`` would otherwise each write (Liger keeps the same
things in ``ops/utils.py``). Nothing here launches a kernel.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # Triton is Linux-only; the reference paths never need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

# The per-block shared-memory opt-in limit of sm_90 (H100 / H200: 228 KiB per SM, 227 KiB to one block).
SM90_MAX_SHARED_BYTES = 227 * 1024


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """A Triton launch can run on ``device``: CUDA, or the CPU under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a kernel for inputs of ``dtype``: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulator(dtype: torch.dtype):
    """``compute_dtype`` as a Triton type (a constexpr argument of the kernels)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(t: torch.Tensor) -> str:
    """``tl.dot`` precision for fp32 operands: IEEE unless the user allowed TF32 matmuls, as torch does.

    fp16 / bf16 operands always take the tensor cores and ignore this.
    """
    if t.is_cuda and t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``F.linear`` would cast to under the current autocast region of ``device_type``, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cpu_bf16_features() -> dict:
    """{"avx512_bf16", "amx"}: the CPU's native bf16 units, as torch's own feature checks see them (private
    helpers, absent in old releases: then False)."""
    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        return bool(fn()) if fn is not None else False
    return {"avx512_bf16": probe("_is_avx512_bf16_supported"), "amx": probe("_is_amx_tile_supported")}


@functools.lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """This CPU has bf16 matrix units (AVX512-BF16 or AMX) and torch has oneDNN to drive them."""
    return any(cpu_bf16_features().values()) and torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def exact_bf16_products(dtype: torch.dtype):
    """For bf16 ``dtype`` on a native-bf16 CPU: fp32 matmuls inside run on oneDNN's bf16 units (fp32 math mode
    "bf16": inputs rounded to bf16, fp32 accumulation, fp32 output). Exact for fp32 tensors that hold bf16 values
    (upcast bf16 tensors): the products and the fp32 sums are those of the fp32 GEMM, at the bf16 rate (measured,
    2 AVX512-BF16 cores: [192, 65, 64] x [192, 64, 65] 625 -> 357 us, same error against fp64). fp16 values are
    not exact in bf16, so fp16 (and torch.compile tracing, and CPUs without bf16 units) keep full fp32 math. The
    setting is process-wide: restored on the way out, after an error too."""
    if dtype != torch.bfloat16 or torch.compiler.is_compiling() or not native_bf16_cpu():
        yield
        return
    precision = torch.backends.mkldnn.matmul
    before = precision.fp32_precision
    precision.fp32_precision = "bf16"
    try:
        yield
    finally:
        precision.fp32_precision = before


def launch(kernel, grid, args: tuple, meta: dict, device: torch.device) -> None:
    """``kernel[grid](*args, **meta)`` with ``device`` made the current CUDA device for the launch.

    Triton launches on the *current* device and stream, not on the tensors' device: without the guard a process
    whose current device is cuda:0 would run a kernel for cuda:1 tensors on the wrong GPU. Every fdfast launch
    goes through here (``kernel`` is a ``triton.jit`` function or its autotuned twin), which is also the one
    place tools hook to see the launches (bench/gpu_budget.py records them instead of running them).
    """
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **meta)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n and >= minimum (tl.arange sizes; tl.dot needs >= 16)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def padded_tokens(n: int) -> int:
    """Token count a per-call table is padded to: a multiple of 16, so Triton knows every row starts aligned
    (integer arguments divisible by 16 are specialised) and can load bias rows as vectors."""
    return round_up(n, 16)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere, where one program at a time runs."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def batch_chunks(B: int, programs_per_chunk: int, device: torch.device, per_sm: int = 4) -> int:
    """How many chunks to split a batch of B into so that chunks x programs_per_chunk fill the GPU about
    ``per_sm`` times over; one chunk under the interpreter (it pays per program, not per loop turn)."""
    if device.type != "cuda":
        return 1
    want = max(1, (per_sm * num_sms(device)) // max(1, programs_per_chunk))
    chunk = -(-B // min(B, want))
    return -(-B // chunk)


def mm_fp32_accumulate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation AND an fp32 result (fp64 stays fp64): cuBLAS's out_dtype on CUDA for
    fp16 / bf16 (tensor cores, no rounding of the sum to 16 bits, which could overflow fp16), an upcast elsewhere."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    acc = compute_dtype(a.dtype)
    return torch.mm(a.to(acc), b.to(acc))
