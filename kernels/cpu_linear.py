"""Inference linears on oneDNN-prepacked bf16 weights: the CPU's fast path for the frozen teacher.

``F.linear`` on bf16 CPU tensors hands oneDNN a plain row-major weight on every call (and ``addmm`` first copies
the bias into the output). Reordering a frozen weight once into oneDNN's blocked layout
(``mkldnn._reorder_linear_weight``, what Inductor's CPU freezing pass does for constants) and calling
``mkldnn._linear_pointwise`` runs the GEMM with the bias, and GELU where asked, in its epilogue. Measured on
2 AVX512-BF16 cores (AMD EPYC, 2080 rows, the demo teacher's shapes): [2080, 384] x [384, 1536] + bias + GELU
2.7 ms packed against 3.2 ms + 1.3 ms for ``F.linear`` + ``F.gelu``; the DINOv2-S/14 teacher's forward at
112 px, batch 32, 128 -> 118 ms (interleaved A/B in one process).

- ``linear(x, weight, bias, act=None)`` is ``F.linear`` (then ``F.gelu`` for act "gelu" / "gelu_tanh"). It takes
  the packed path when no gradient is needed, the weight is frozen (requires_grad False) and the math is bf16
  on a native-bf16 CPU (``packed_linear_usable``); everything else (training, fp32, CUDA, DTensor weights,
  torch.compile tracing) is exactly those torch calls.
- A weight is packed once, in a cache keyed by identity, rebuilt when its storage or version changes (.to(),
  ``load_state_dict``'s copy_), freed with the weight, never in a state dict, a pickle or a deepcopy.
- Trainable weights are not packed: re-packing after each optimizer step (fused AdamW changes weights in place
  without bumping ``_version``) costs more than it saves (measured: the demo student's forward + backward on
  packed W and W^T 172 ms against 155 ms on ``F.linear``).

``fdfast.fastpath.pack_linears`` puts a timm model's ``nn.Linear`` and ``Mlp`` modules on this function.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from .utils import autocast_dtype, native_bf16_cpu

_PACK_ROWS_HINT = 2048  # oneDNN's layout hint (rows of x); the packed weight serves any row count


@functools.lru_cache(maxsize=1)
def _ops_present() -> bool:
    """oneDNN's packed-linear ops exist, bf16 runs natively here, and a probe matches F.linear."""
    try:
        ops = torch.ops.mkldnn
        if not (torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()):
            return False
        x = torch.linspace(-1, 1, 3 * 8).reshape(3, 8).bfloat16()
        w = torch.linspace(-1, 1, 5 * 8).reshape(5, 8).bfloat16()
        y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(y.float(), F.linear(x.float(), w.float()), atol=2e-2, rtol=2e-2))


@functools.lru_cache(maxsize=1)
def packed_linear_available() -> bool:
    """Packed bf16 linears can run on this machine (native bf16 CPU: AVX512-BF16 or AMX; oneDNN ops present)."""
    return native_bf16_cpu() and _ops_present()


def _bf16_math(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``F.linear(x, weight)`` computes in bf16 on the CPU here (autocast bf16, or bf16 inputs)."""
    amp = autocast_dtype("cpu")
    return amp == torch.bfloat16 if amp is not None else x.dtype == weight.dtype == torch.bfloat16


def packed_linear_usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """``linear(x, weight, bias)`` takes the packed path: inference (no gradient anywhere) with a frozen weight,
    plain CPU tensors, bf16 math on a native-bf16 CPU, not under torch.compile tracing."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and weight.device.type == "cpu"
            and type(weight.data) is torch.Tensor and not weight.requires_grad
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and x.layout == torch.strided and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16)
            and _bf16_math(x, weight)
            and packed_linear_available())


# ----------------------------------------------------------------------------- packing
# id(weight) -> (weakref(weight), version, data_ptr, packed W). An entry leaves with its weight (weakref
# callback) and is rebuilt when the weight's storage or version changes.
_PACKED: dict[int, tuple] = {}


def _drop(key: int):
    return lambda _ref: _PACKED.pop(key, None)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 oneDNN layout of a frozen ``weight`` [N, K] (an opaque mkldnn tensor), cached."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1:3] != (weight._version, weight.data_ptr()):
        with torch.no_grad():
            w = weight.detach().to(torch.bfloat16).contiguous()
            entry = (weakref.ref(weight, _drop(key)), weight._version, weight.data_ptr(),
                     torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS_HINT))
        _PACKED[key] = entry
    return entry[3]


def packed_cache_size() -> int:
    """How many weights hold a packed copy (tests: the cache empties with its weights)."""
    return len(_PACKED)


ACTS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}  # act -> oneDNN attr, algorithm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then GELU for act "gelu" / "gelu_tanh"), on a packed bf16 weight with
    bias and GELU in the GEMM when ``packed_linear_usable``; elsewhere exactly those torch calls."""
    if act not in ACTS:
        raise ValueError(f"cpu_linear.linear: act must be None, 'gelu' or 'gelu_tanh', got {act!r}")
    attr, algorithm = ACTS[act]
    if not packed_linear_usable(x, weight, bias):
        y = F.linear(x, weight, bias)
        return y if act is None else F.gelu(y, approximate=algorithm)
    with torch.autocast("cpu", enabled=False):
        b = bias.to(torch.bfloat16) if bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), _packed(weight), b, attr, [], algorithm)
