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


if __name__ == "__main__":
    print("\n".join(summarize(Path(sys.argv[1]))))
