"""The planner against a real GPU: planned peak (fake tensors, CPU) vs ``torch.cuda.max_memory_allocated``.

    python bench/plan_check.py [--out DIR] [--quick] [--dry-run]

For each model (the CPU tests' small pairs at GPU sizes, plus a ViT-B pair) it plans one bf16 FD step on fake
tensors and runs the same step on the GPU twice: with the planner's ATen paths (SDPA's math kernel, reference
loss: the comparison the +-15% target is about) and with the recipe's fused paths (Triton attention and loss:
the planner's margin over the kernels that really run). Writes DIR/plan_check.json and prints a table.
``--dry-run`` (no GPU needed) runs the smallest case on the CPU in fp32 so the script is known to work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fdfast.config import load_config
from fdfast.plan import validate

VIT = {"model.patch_size": 16, "model.img_size": 224}
CASES = [  # (name, overrides, batch, activation checkpointing)
    ("vit-tiny pair", {**VIT, "model.size": "tiny", "teacher.name": "vit_tiny_patch16_224"}, 64, False),
    ("vit-small pair, AC", {**VIT, "model.size": "small", "teacher.name": "vit_small_patch16_224"}, 64, True),
    ("vit-small pair", {**VIT, "model.size": "small", "teacher.name": "vit_small_patch16_224"}, 64, False),
    ("vit-base pair, AC", {**VIT, "model.size": "base", "teacher.name": "vit_base_patch16_224"}, 64, True),
    ("swinv2-tiny (w14) <- swinv2-tiny (w8)",
     {"model.arch": "swinv2", "model.size": "tiny", "model.patch_size": 4, "model.img_size": 224,
      "teacher.name": "swinv2_tiny_window8_256", "teacher.img_size": 224, "teacher.kwargs": {"window_size": 7}},
     32, False),
]


def run(cases, device: str, amp, fused: bool) -> list[dict]:
    rows = []
    for name, overrides, batch, ac in cases:
        cfg = load_config("demo", dict(overrides))
        row = dict(model=name, batch=batch, activation_checkpointing=ac)
        for paths, key in ((True, "aten"), (False, "fused")):
            if key == "fused" and (device == "cpu" or not fused):
                continue  # the fused kernels need CUDA (the interpreter's memory is not the GPU's)
            t0 = time.perf_counter()
            # the ATen run takes SDPA's math kernel on the GPU too: the one the CPU trace follows (a bias that
            # needs a gradient has no CPU flash kernel); the fused run shows the margin over what really runs
            kernels = sdpa_kernel([SDPBackend.MATH]) if paths else contextlib.nullcontext()
            try:
                with kernels:
                    r = validate(cfg, batch, ac, amp, device=device, planner_paths=paths)
            except Exception as e:  # one failing case must not hide the others' numbers
                row[key] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            row["planned_gib"] = round(r["planned"] / 2**30, 3)
            row[key] = dict(measured_gib=round(r["measured"] / 2**30, 3), ratio=round(r["ratio"], 3),
                            seconds=round(time.perf_counter() - t0, 1))
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="folder for plan_check.json")
    ap.add_argument("--quick", action="store_true",
                    help="the first two cases, ATen paths only (no Triton compiles): ~30 s; the full run ~3 min")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the smallest case, 64 px, fp32, on the CPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        cases = [(n, {**o, "model.img_size": 64, "teacher.img_size": 64}, 8, ac) for n, o, _, ac in CASES[:1]]
        device, amp = "cpu", None
    else:
        if not torch.cuda.is_available():
            print("plan_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        cases, device, amp = (CASES[:2] if args.quick else CASES), "cuda", torch.bfloat16
    rows = run(cases, device, amp, fused=not args.quick)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, precision="bf16" if amp else "fp32", dry_run=args.dry_run,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("plan_check_dry_run.json" if args.dry_run else "plan_check.json")).write_text(
        json.dumps(dict(meta, rows=rows), indent=1))
    print(f"\n{'model':40s} {'batch':>5s} {'AC':>3s} {'planned':>8s} {'ATen':>8s} {'ratio':>6s} {'fused':>8s} {'ratio':>6s}")
    for r in rows:
        a, f = r.get("aten", {}), r.get("fused", {})
        print(f"{r['model']:40s} {r['batch']:5d} {'on' if r['activation_checkpointing'] else 'off':>3s} "
              f"{r.get('planned_gib', float('nan')):8.3f} {a.get('measured_gib', float('nan')):8.3f} "
              f"{a.get('ratio', float('nan')):6.3f} {f.get('measured_gib', float('nan')):8.3f} {f.get('ratio', float('nan')):6.3f}")
    bad = [r["model"] for r in rows if not 0.85 <= r.get("aten", {}).get("ratio", 0) <= 1.15]
    print(f"plan_check: {len(rows) - len(bad)}/{len(rows)} within +-15% of the measured peak (ATen paths)"
          + (f"; outside: {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
