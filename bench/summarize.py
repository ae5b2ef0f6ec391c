"""Short table of a GPU check's bench rows: one line per (suite, shape, mode), fdfast against each baseline.

    python bench/summarize.py DIR        (DIR holds the loss / attention / e2e .jsonl files of bench/run.py)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# the bench rows' own names: time column and provider per suite; fdfast is the provider compared
TIME_KEY = {"loss": "ms_min", "attention": "ms_min", "e2e": "step_ms"}
FDFAST = {"loss": "fdfast", "attention": "fdfast", "e2e": "fdfast"}


def summarize(folder: Path) -> list[str]:
    lines = []
    for suite, key in TIME_KEY.items():
        path = folder / f"{suite}.jsonl"
        if not path.exists():
            continue
        groups: dict[tuple, dict] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            group = (row.get("shape"), row.get("mode"), row.get("dtype"))
            groups.setdefault(group, {})[row["provider"]] = row[key]
        for (shape, mode, dtype), times in groups.items():
            mine = times.get(FDFAST[suite])
            if not mine:
                continue
            ratios = " ".join(f"{p} {t / mine:.2f}x" for p, t in times.items() if p != FDFAST[suite] and t)
            lines.append(f"{suite:<9} {shape!s:<28} {mode or '':<8} fdfast {mine:8.3f} ms, speedup over: {ratios}")
    return lines


def bias_cost(folder: Path) -> list[str]:
    """The attention suite's bias-cost rows: the Triton path with / without the learned bias and its gradient."""
    path = folder / "attention.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    lines = []
    for r in rows:
        if not r["provider"].startswith("bias_cost:"):
            continue
        kernels = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("kernel_ms") or {}).items())
        lines.append(f"bias cost {r['shape']:<12} {r['mode']:<4} {r['provider'][10:]:<9} {r['ms_min']:8.3f} ms "
                     f"({r['speedup']:.2f}x of the with-bias time){'; kernels ms: ' + kernels if kernels else ''}")
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(Path(sys.argv[1])) + bias_cost(Path(sys.argv[1]))))
