"""The fault loop of issue 24 as a script: SIGKILL / group SIGTERM at start-up, mid-step, mid-checkpoint, mid-swap of
a committed step, after an explicit resume to an earlier step, and during fine-tuning; each trial resumed with
--resume auto and compared bit for bit with an uninterrupted run (tests/test_fault_loop.py has the trials).

    python bench/fault_loop.py --trials 40 --out /tmp/faults [--summary bench/results/fault_loop.json]

Prints one JSON line per trial and a summary (counts per trial kind, signal, moment and exit code); exits 1 when a
trial fails. Run it from the repository root: the runs it starts import this checkout's fdfast.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fault_loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
