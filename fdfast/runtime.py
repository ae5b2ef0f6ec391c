"""Where a run executes: device, ranks, precision; and the process settings the command line applies once.

    rt = runtime.resolve(cfg.runtime, "fdfast train")   # device, torchrun ranks, autocast dtype: no process state
    runtime.apply(cfg.runtime, rt.device)              # the CLI edge only: glibc malloc (fdfast.hostmem)

``resolve`` is what every run needs and changes nothing process-wide except what torchrun itself requires (the
process group and the rank's CUDA device). ``apply`` makes the process-wide settings (the host allocator) and is
called by the ``fdfast train`` / ``fdfast finetune`` command lines (and so by every rank ``fdfast.launch``
starts), never by a library call: ``fdfast.train.train()`` called from Python leaves the process as it found it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from fdfast import distributed, hostmem
from fdfast.distributed import DistInfo
from fdfast.errors import FDFastError

# runtime.precision (fdfast.config.Precision, but auto) -> autocast dtype
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED_MIX = 1_000_003  # a prime that mixes a second number (rank, epoch, data seed) into a seed


def mix_seed(seed: int, other: int) -> int:
    """One seed from two numbers (run seed and rank, data seed and run seed, ...); always >= 0 for NumPy."""
    return (int(seed) * SEED_MIX + int(other)) % 2**63


def resolve_device(name: str) -> torch.device:
    """runtime.device -> a torch device: auto is CUDA when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FDFastError("runtime.device=cuda asked for (--device cuda), but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def cpu_flags() -> dict:
    """What this CPU offers for bf16 math, as torch sees it (for the precision choice, summary.json, benches)."""
    from fdfast.kernels.utils import cpu_bf16_features
    return {"capability": torch.backends.cpu.get_cpu_capability(), **cpu_bf16_features(),
            "threads": torch.get_num_threads()}


def native_bf16(device: torch.device) -> bool:
    """bf16 runs at the hardware's full matmul rate here: CUDA, or a CPU with AMX tiles or AVX512-BF16."""
    from fdfast.kernels.utils import native_bf16_cpu
    return device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). auto: bf16 where it runs natively (``native_bf16``), else fp32."""
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise FDFastError("runtime.precision=fp16 needs CUDA (a GradScaler); on the CPU use bf16 or fp32")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {v: k for k, v in PRECISIONS.items()}[dtype]


def precision_summary(setting: str, amp_dtype: torch.dtype | None, device: torch.device) -> dict:
    """What runs and why, as printed at start and written to summary.json."""
    if setting != "auto":
        why = f"runtime.precision={setting}"
    elif device.type == "cuda":
        why = "auto: CUDA"
    else:
        flags = cpu_flags()
        has = "AMX" if flags["amx"] else "AVX512-BF16" if flags["avx512_bf16"] else "no native bf16"
        why = f"auto: this CPU has {has}"
    if amp_dtype is not None:
        why += "; --set runtime.precision=fp32 for full fp32"
    out = {"precision": precision_name(amp_dtype), "why": why}
    if device.type == "cpu":
        from fdfast.kernels.cpu_linear import packed_linear_available
        out["cpu"] = cpu_flags()
        out["teacher_linear"] = ("oneDNN-packed bf16 (packed once, bias and GELU in the GEMM)"
                                 if amp_dtype == torch.bfloat16 and packed_linear_available() else "F.linear")
    return out


@dataclass
class Runtime:
    """Where a run executes and in what precision (``resolve``); ``malloc`` reports what ``apply`` did."""
    info: DistInfo  # rank, local rank, world size, device
    amp_dtype: torch.dtype | None  # autocast dtype; None: fp32
    precision: dict = field(default_factory=dict)  # precision_summary: printed at start, in summary.json
    malloc: dict = field(default_factory=dict)  # hostmem's report: applied by the CLI, or why not

    @property
    def device(self) -> torch.device:
        return self.info.device

    def autocast(self):
        """The run's autocast region (a fresh context manager per call)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve(runtime_cfg, world: DistInfo | None = None) -> Runtime:
    """Device, ranks and precision of a run from its ``runtime`` config section (FD or fine-tune).

    Under torchrun this joins the process group (``distributed.init_distributed``) unless ``world`` is given.
    """
    info = world or distributed.init_distributed(resolve_device(runtime_cfg.device))
    amp_dtype = resolve_precision(runtime_cfg.precision, info.device)
    return Runtime(info, amp_dtype, precision_summary(runtime_cfg.precision, amp_dtype, info.device),
                   hostmem.report(runtime_cfg.malloc, info.device))


def apply(runtime_cfg, device: torch.device | None = None) -> dict:
    """The process-wide settings of ``runtime_cfg`` (the command line's job, once per process): glibc malloc."""
    return hostmem.configure(runtime_cfg.malloc, device or resolve_device(runtime_cfg.device))
