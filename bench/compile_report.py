"""sm_90 compile report without a GPU: registers, spills and shared memory of every fdfast kernel config.

    python bench/compile_report.py [--out DIR] [--dtypes bf16,fp16,fp32] [--head-dims 32,64,128]

Every launch configuration the kernels can use on an H100 / H200 (the fixed FD-loss tiles and every attention
autotune candidate that survives its pruning, at each head dim) is compiled for ``GPUTarget("cuda", 90, 32)``
by Triton on the CPU; the bundled ``ptxas -arch=sm_90a -v`` reports registers per thread and spill bytes, and
the compiled metadata gives the static shared memory. Writes DIR/compile_report.txt (the table) and
DIR/compile_report.json (one object per config). A config is "ok" when it spills nothing and its shared memory
fits the 227 KiB a block may opt into on sm_90.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# compiling needs the real JIT functions, not the interpreter's: set before triton is imported
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fdfast.kernels import fd_loss, rpb_attention  # noqa: E402
from fdfast.kernels.utils import SM90_MAX_SHARED_BYTES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# pointer arguments that are fp32 whatever the input dtype (statistics, partial sums, tables)
FP32_POINTERS = {"Mean", "Rstd", "PartialLoss", "Scale", "Extra", "Lse", "Delta", "DBiasPart"}
FLOAT_ARGS = {"eps", "beta", "inv_beta", "sm_scale", "qk_scale_log2"}
# integer (size) arguments per module: the other capitalised arguments are tensors
INT_ARGS = {"fd_loss": {"M", "CS", "CT"}, "attention": {"B", "H", "N", "D", "W", "NP"}}
# integer arguments that are multiples of 16 at the shapes the kernels train on (Triton specialises those)
DIVISIBLE_INTS = {"CS", "CT", "NP"}


def _is_unit_stride(name: str) -> bool:
    return re.fullmatch(r"s_[a-z]d", name) is not None  # the head-dim stride of a [B, H, N, D] tensor: 1


def signature_of(fn, dtype: torch.dtype, constexprs: dict, ints: set):
    """ASTSource inputs for a launch with realistic arguments: types, constants, divisibility hints."""
    signature, consts, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name], consts[name] = "constexpr", constexprs[name]
        elif name not in ints and (name[0].isupper() or re.match(r"d[A-Z]", name)):  # tensors (dQ: a gradient)
            # torch allocations are 16-byte aligned
            signature[name] = "*" + ("fp32" if name in FP32_POINTERS else TRITON_TYPE[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif _is_unit_stride(name):  # Triton specialises an integer 1 to a constant
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name in DIVISIBLE_INTS or name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


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


def compile_one(name, fn, dtype, constexprs, num_warps, num_stages) -> dict:
    ints = INT_ARGS["attention" if name.startswith("attn") else "fd_loss"]
    signature, consts, attrs = signature_of(fn, dtype, constexprs, ints)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, spill = ptxas_usage(compiled.asm["ptx"])
    shared = int(compiled.metadata.shared)
    tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k == "GROUP_M"}
    return dict(kernel=name, dtype=TRITON_TYPE[dtype], tiles=tiles, num_warps=num_warps, num_stages=num_stages,
                registers=regs, spill_bytes=spill, shared_bytes=shared,
                ok=spill == 0 and shared <= SM90_MAX_SHARED_BYTES, compile_s=round(time.perf_counter() - start, 2))


def fd_loss_specs(dtype):
    """The FD-loss launches at ``dtype``: fixed tiles per operand class (see fd_loss.GPU_TILES)."""
    operands = "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"
    for name, fn, tiles, flags in fd_loss.launch_specs():
        cfg = dict(tiles[operands])
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        yield name, fn, dict(flags, **cfg, ACC=triton.language.float32, DOT_PRECISION="ieee"), warps, stages


def all_specs(dtypes, head_dims):
    for dtype in dtypes:
        yield from ((n, f, dtype, c, w, s) for n, f, c, w, s in fd_loss_specs(dtype))
        for block_d in head_dims:
            yield from ((n, f, dtype, c, w, s) for n, f, c, w, s in rpb_attention.launch_specs(dtype, block_d))


def format_table(rows) -> str:
    lines = [f"sm_90 compile report (Triton {triton.__version__}, target {TARGET.arch}, ptxas -v; "
             f"shared limit {SM90_MAX_SHARED_BYTES // 1024} KiB per block)",
             f"{'kernel':<20} {'dtype':<5} {'tiles':<44} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>6} "
             f"{'smem KiB':>8}  ok"]
    for r in rows:
        tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["tiles"].items())
        lines.append(f"{r['kernel']:<20} {r['dtype']:<5} {tiles:<44} {r['num_warps']:>5} {r['num_stages']:>6} "
                     f"{r['registers']:>5} {r['spill_bytes']:>6} {r['shared_bytes'] / 1024:>8.1f}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"{len(rows)} configs, {len(bad)} not ok")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the .txt and .json")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="32,64,128", help="attention BLOCK_D values (padded head dims)")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args(argv)
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        head_dims = [int(d) for d in args.head_dims.split(",")]
    except (KeyError, ValueError):
        print(f"compile_report: --dtypes takes {','.join(DTYPES)}; --head-dims takes powers of two, e.g. 32,64,128",
              file=sys.stderr)
        return 2
    rows = []
    for name, fn, dtype, constexprs, warps, stages in all_specs(dtypes, head_dims):
        if args.only not in name:
            continue
        rows.append(compile_one(name, fn, dtype, constexprs, warps, stages))
        print(f"  {name} {TRITON_TYPE[dtype]} {rows[-1]['tiles']} w{warps} s{stages}: {rows[-1]['registers']} regs, "
              f"{rows[-1]['spill_bytes']} B spill, {rows[-1]['shared_bytes']} B smem", file=sys.stderr, flush=True)
    table = format_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_report.txt").write_text(table + "\n")
    meta = dict(triton=triton.__version__, torch=torch.__version__, target=f"cuda sm_{TARGET.arch}",
                shared_limit_bytes=SM90_MAX_SHARED_BYTES)
    (out / "compile_report.json").write_text(json.dumps(dict(meta, configs=rows), indent=1) + "\n")
    print(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
