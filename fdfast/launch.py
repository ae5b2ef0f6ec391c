"""`python -m fdfast.launch [torchrun args] -m fdfast train ...`: torchrun, but a stop signal ends it with 130.

torchrun forwards SIGINT / SIGTERM to each rank's process group and waits (TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
30 s by default, then SIGKILL) while the ranks finish their step, commit it together and exit 130
(fdfast.signals); then it re-raises the signal as a SignalException: a traceback and exit code 1. This
wrapper takes torchrun's arguments unchanged and turns that ending (and ranks that all exited 130 on their
own) into one line and exit code 130, the code `fdfast train` ends with, so a scheduler that requeues on it
sees the same code with or without a launcher.
"""
from __future__ import annotations

import sys

STOPPED = 130  # 128 + SIGINT: what `fdfast train` exits with after committing on a stop signal


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        print(f"fdfast.launch: {e.sigval.name}: the ranks were asked to commit their step and stop", file=sys.stderr)
        return STOPPED
    except ChildFailedError as e:
        if not all(f.exitcode == STOPPED for f in e.failures.values()):
            raise
        print("fdfast.launch: every rank stopped on a signal after committing its step", file=sys.stderr)
        return STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
