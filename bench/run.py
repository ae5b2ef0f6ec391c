"""fdfast benchmarks: each provider side by side with its baseline in one run, reported as ratios.

    python bench/run.py [--suite loss|attention|data|e2e|all] [--device cpu|cuda] [--quick] [--results DIR]

Every row is appended as one JSON line to DIR/<suite>.jsonl (default bench/results/) together with the device name,
torch / triton versions, the git sha and the time, and printed as a table at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SUITES = ("loss", "attention", "data", "e2e")
RESULTS = ROOT / "bench" / "results"


def environment(device: str) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        sha += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return dict(device=device, device_name=name, cpu_count=os.cpu_count(), torch=torch.__version__,
                triton=triton_version, python=platform.python_version(), git_sha=sha,
                time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


@dataclass
class Context:
    """What a suite gets: where to run, how long, and where its rows go."""
    suite: str
    device: str
    quick: bool
    env: dict
    results: Path = RESULTS
    rows: list = field(default_factory=list)

    def record(self, **row) -> dict:
        full = dict(suite=self.suite, **row, **self.env)
        self.rows.append(full)
        self.results.mkdir(parents=True, exist_ok=True)
        with open(self.results / f"{self.suite}.jsonl", "a") as f:
            f.write(json.dumps(full) + "\n")
        return full


def print_table(rows: list[dict]) -> None:
    env_keys = set(rows[0]) & {"device", "device_name", "cpu_count", "torch", "triton", "python", "git_sha", "time", "suite"}
    keys = [k for k in rows[0] if k not in env_keys]
    for r in rows[1:]:
        keys += [k for k in r if k not in keys and k not in env_keys]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in table)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", choices=SUITES + ("all",))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (about a minute on CPU)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the .jsonl rows go to")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
            return 2
    env = environment(args.device)
    suites = SUITES if args.suite == "all" else (args.suite,)
    status = 0
    for name in suites:
        try:
            module = importlib.import_module(f"bench.suites.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.suites.{name}":
                print(f"bench: suite {name!r} is not built yet", file=sys.stderr)
                status = 1
                continue
            raise
        ctx = Context(name, args.device, args.quick, env, args.results)
        print(f"== {name} ({env['device_name']}, torch {env['torch']}, triton {env['triton']}, {env['git_sha']})")
        module.run(ctx)
        if ctx.rows:
            print_table(ctx.rows)
        print(f"-> {args.results / (name + '.jsonl')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
