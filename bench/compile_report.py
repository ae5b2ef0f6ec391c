"""sm_90 compile report without a GPU: what every fdfast kernel launch compiles to on an H100 / H200.

    python bench/compile_report.py [--out DIR] [--dtypes bf16,fp32] [--only NAME] [--one-per-kernel]

The launches are the real ones: the training shapes (below) run through fdfast's host code on fake CUDA tensors
with the launches recorded (bench/gpu_budget.py), so each row has the constexprs, the autotune candidates left
by the kernel's own prune function, and the argument specialisation the installed Triton derives at run time
(integers divisible by 16, integers equal to 1 as constants, e.g. W = 1 without a shift mask or a unit
stride). Each distinct launch is compiled by Triton for ``GPUTarget("cuda", 90, 32)`` on the CPU; the bundled
``ptxas -arch=sm_90a -v`` gives registers and spill bytes, the metadata the shared memory, and the PTX whether
the matmuls reach the tensor cores (``wgmma.mma_async``, Hopper's warp-group MMA; ``mma.sync``, the pre-Hopper
MMA; "none": FMA loops, as IEEE fp32 must).

Rows are written as they are compiled (a run cut short keeps what it did): DIR/compile_report_triton-X.Y.txt
gets one line per config, DIR/compile_report_triton-X.Y.json is rewritten after each. A config is "ok" when it
spills nothing and its shared memory fits the 227 KiB a block may opt into on sm_90; the exit status is 1 when a
bf16 / fp16 config is not (fp32, the IEEE correctness path, spills at head dims >= 64 and is reported only).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # compiling needs the real JIT functions: set before triton is imported (as a script
    os.environ["TRITON_INTERPRET"] = "0"  # only: tests import the launch list into interpreted processes)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.gpu_budget import Recorder, attention_call, fake_cuda, fd_loss_call  # noqa: E402
from fdfast.kernels.utils import SM90_MAX_SHARED_BYTES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MINOR = ".".join(triton.__version__.split(".")[:2])
STEM = f"compile_report_triton-{MINOR}"

# (label, B, H, N, D, W): the attention shapes FD trains (ViT-B/16 and ViT-L/14 heads, SwinV2 windows of 7 x 7
# and 14 x 14 with the shift mask), a head dim of 128, and the head dim of 16 the CPU tests use
ATTENTION_SHAPES = [("vit_b", 128, 12, 197, 64, 0), ("vit_l14", 64, 16, 257, 64, 0), ("swin_w7", 2048, 4, 49, 32, 64),
                    ("swin_w14", 2048, 4, 196, 32, 16), ("d128", 64, 8, 197, 128, 0), ("tests_d16", 4, 2, 197, 16, 0),
                    ("tests_d16_small", 4, 2, 16, 16, 2)]
LOSS_SHAPE = ("vit_b", 256, 197, 768, 768)  # (label, B, N, Cs, Ct)


def workloads(dtypes):
    """(label, dtype name, call): one forward + backward each, as training runs them."""
    label, B, N, CS, CT = LOSS_SHAPE
    for name, dtype in dtypes.items():
        if dtype == torch.float32:  # fp32 end to end, no autocast: the IEEE path
            yield f"{label} T fp32", name, lambda: fd_loss_call(B, N, CS, CT, torch.float32)
            continue
        for teacher in ("bf16", "fp32"):  # the teacher's tokens: bf16 as training keeps it, or fp32
            t_dtype = DTYPES[teacher]
            if dtype == torch.bfloat16:  # fp32 student tokens, cast by bf16 autocast as training does
                call = (lambda t=t_dtype: fd_loss_call(B, N, CS, CT, torch.float32, t, autocast=True))
            else:
                call = (lambda t=t_dtype, d=dtype: fd_loss_call(B, N, CS, CT, d, t))
            yield f"{label} T {teacher}", name, call
    for name, dtype in dtypes.items():
        for label, B, H, N, D, W in ATTENTION_SHAPES:
            shape = (B, H, N, D, W, dtype)
            yield label, name, lambda a=shape: attention_call(*a)
            if label == "vit_b":  # what the learned bias costs: no bias at all, and a bias without gradient
                yield f"{label} no bias", name, lambda a=shape: attention_call(*a, bias=False)
                yield f"{label} frozen bias", name, lambda a=shape: attention_call(*a, bias_grad=False)


def _source(fn) -> str:
    """A @triton.jit function's source from ``def`` on, as Triton keeps it (the same under the interpreter)."""
    src = textwrap.dedent(inspect.getsource(fn.fn))
    return src[re.search(r"^def\s+\w+\s*\(", src, re.MULTILINE).start():]


def source_hash(fn) -> str:
    """sha256 (12 hex) of the kernel's source and of every @triton.jit helper it calls, transitively."""
    module = sys.modules[fn.fn.__module__]
    helpers = {n: f for n, f in vars(module).items()  # the module's @triton.jit functions, compiled or interpreted
               if type(f).__name__ in ("JITFunction", "InterpretedFunction")}
    seen, todo, h = set(), [fn.fn.__name__], hashlib.sha256()
    while todo:
        name = todo.pop()
        if name in seen or name not in helpers:
            continue
        seen.add(name)
        src = _source(helpers[name])
        h.update(src.encode())
        todo += [n for n in helpers if re.search(rf"\b{n}\(", src)]
    return h.hexdigest()[:12]


def ast_source(jit, specs, consts):
    """ASTSource inputs from the recorded launch: runtime args by their specialisation, constexprs by value."""
    signature, constexprs, attrs, it = {}, {}, {}, iter(specs)
    for i, param in enumerate(jit.params):
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", consts[param.name]
            continue
        kind, attr = next(it)
        if kind == "constexpr":  # an integer equal to 1: Triton folds it into the kernel
            signature[param.name], constexprs[param.name] = "constexpr", attr
            continue
        signature[param.name] = kind
        if attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(jit, signature, constexprs, attrs)


def spec_text(jit, specs, args) -> str:
    """The run-time specialisation of the integer arguments: 'N=197 NP=208/16 W=1c' (/16: divisible by 16, c: the
    constant 1). Strides are summarised: 'strides /16' when every one but the unit strides divides by 16."""
    names = [p.name for p in jit.params if not p.is_constexpr]
    sizes, odd_strides, unit = [], [], 0
    for name, (kind, attr), arg in zip(names, specs, args):
        if isinstance(arg, bool) or not isinstance(arg, int):
            continue
        text = f"{name}={arg}" + ("c" if kind == "constexpr" else "/16" if attr == "D" else "")
        if not name.startswith("s_"):
            sizes.append(text)
        elif kind == "constexpr":
            unit += 1
        elif attr != "D":
            odd_strides.append(text)
    strides = (f"strides /16 ({unit} unit)" if not odd_strides else " ".join(odd_strides)) if unit or odd_strides \
        else ""
    return " ".join(sizes + ([strides] if strides else []))


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from the bundled ptxas -v."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores", text)
    return regs, int(spills.group(1)) if spills else 0


def tensor_cores(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "none"


def identity(c: dict) -> dict:
    """What names a recorded launch in the report: kernel, workload, dtype, tiles, other constexprs, warps, stages."""
    consts = c["consts"]
    tiles = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k == "GROUP_M"}
    flags = {k: (v if isinstance(v, (bool, int, str)) else str(v)) for k, v in consts.items() if k not in tiles}
    label, dtype_name = c["label"]
    return dict(kernel=c["name"].lstrip("_"), workload=label, dtype=dtype_name, tiles=tiles, flags=flags,
                num_warps=c["num_warps"], num_stages=c["num_stages"])


def row_key(row: dict) -> str:
    return json.dumps({k: row[k] for k in ("kernel", "workload", "dtype", "tiles", "flags", "num_warps",
                                           "num_stages")}, sort_keys=True)


def compile_one(c: dict) -> dict:
    """Compile one recorded launch for sm_90 and read what it uses."""
    jit, specs = c["jit"], c["specs"]
    start = time.perf_counter()
    compiled = triton.compile(ast_source(jit, specs, c["consts"]), target=TARGET,
                              options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    ptx = compiled.asm["ptx"]
    regs, spill = ptxas_usage(ptx)
    shared = int(compiled.metadata.shared)
    pointers = {p.name: kind[1:] for p, (kind, _) in zip([p for p in jit.params if not p.is_constexpr], specs)
                if kind.startswith("*")}
    return dict(identity(c), pointer_dtypes=pointers, specialisation=spec_text(jit, specs, c["args"]),
                registers=regs, spill_bytes=spill, shared_bytes=shared, tensor_cores=tensor_cores(ptx),
                ok=spill == 0 and shared <= SM90_MAX_SHARED_BYTES, source_hash=source_hash(jit),
                triton=triton.__version__, compile_s=round(time.perf_counter() - start, 2))


def collect(dtypes, only="", one_per_kernel=False) -> list:
    """The distinct launches of every workload, in order (one per kernel with ``one_per_kernel``)."""
    rec = Recorder()
    with fake_cuda(rec):
        for label, dtype_name, call in workloads(dtypes):
            rec.label = (label, dtype_name)
            call()
    found, kernels = [], set()
    for c in rec.compiles.values():
        if only not in c["name"] or (one_per_kernel and c["name"] in kernels):
            continue
        kernels.add(c["name"])
        found.append(c)
    return found


HEADER = (f"{'kernel':<15} {'workload':<20} {'dtype':<5} {'tiles':<26} {'w':>2} {'s':>1} {'regs':>4} {'spill':>5} "
          f"{'smem KiB':>8} {'TC':<8} ok   specialisation")


def format_row(r) -> str:
    tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["tiles"].items())
    flags = " no dbias" if r["flags"].get("STORE_DBIAS") is False and "no bias" not in r["workload"] else ""
    return (f"{r['kernel']:<15} {r['workload'] + flags:<20} {r['dtype']:<5} {tiles:<26} {r['num_warps']:>2} "
            f"{r['num_stages']:>1} {r['registers']:>4} {r['spill_bytes']:>5} {r['shared_bytes'] / 1024:>8.1f} "
            f"{r['tensor_cores']:<8} {'yes' if r['ok'] else 'NO ':<4} {r['specialisation']}")


def summary(rows) -> str:
    bad = [r for r in rows if not r["ok"]]
    tc = {}
    for r in rows:
        tc[(r["dtype"], r["tensor_cores"])] = tc.get((r["dtype"], r["tensor_cores"]), 0) + 1
    cores = ", ".join(f"{d} {k}: {n}" for (d, k), n in sorted(tc.items()))
    return f"{len(rows)} configs, {len(bad)} not ok; tensor cores: {cores}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help=f"folder for {STEM}.txt / .json")
    parser.add_argument("--dtypes", default="bf16,fp32", help="operand dtypes: bf16 (training), fp16, fp32")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--one-per-kernel", action="store_true", help="one config of every kernel (a smoke test)")
    args = parser.parse_args(argv)
    try:
        dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    except KeyError:
        print(f"compile_report: --dtypes takes {','.join(DTYPES)}", file=sys.stderr)
        return 2
    launches = collect(dtypes, args.only, args.one_per_kernel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    txt, js = out / f"{STEM}.txt", out / f"{STEM}.json"
    meta = dict(triton=triton.__version__, torch=torch.__version__, target=f"cuda sm_{TARGET.arch}",
                shared_limit_bytes=SM90_MAX_SHARED_BYTES, configs_planned=len(launches))
    with open(txt, "w") as f:
        f.write(f"sm_90 compile report (Triton {triton.__version__}, target {TARGET.arch}, ptxas -v; shared limit "
                f"{SM90_MAX_SHARED_BYTES // 1024} KiB per block; TC: tensor-core instructions in the PTX; "
                f"specialisation: /16 divisible by 16, c a constant)\n{HEADER}\n")
    rows = []
    for launch in launches:
        rows.append(compile_one(launch))
        with open(txt, "a") as f:  # one line per config as it is compiled: a run cut short keeps its rows
            f.write(format_row(rows[-1]) + "\n")
        tmp = js.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(meta, configs=rows), indent=1) + "\n")
        tmp.replace(js)
        print(format_row(rows[-1]), flush=True)
    with open(txt, "a") as f:
        f.write(summary(rows) + "\n")
    print(summary(rows))
    # fp32 is the correctness path (IEEE products in small tiles): its spills are known and accepted
    return 0 if all(r["ok"] for r in rows if r["dtype"] != "fp32") else 1


if __name__ == "__main__":
    sys.exit(main())
