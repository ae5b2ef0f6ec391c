"""Run a command in its own session and signal its whole process group, as schedulers and Ctrl-C do.

    run = GroupRun([sys.executable, "-m", "fdfast", "train", ...], tmp_path / "logs")
    run.wait_for(lambda: metrics_lines(out) >= 3)     # a marker that the run is mid-way
    run.killpg(signal.SIGTERM)                        # every process of the group: main, workers, forkserver
    rc = run.wait()                                   # then run.stderr, run.group_alive()

start_new_session=True makes the child the leader of a new session and process group (its pgid is its
pid), so os.killpg reaches it and everything it forks, and nothing of the test process itself.

    argv = pause_swaps_argv([sys.executable, "-m", "fdfast", "train", ...], flags, pause_s=30)

runs the same command through this file, which pauses the process inside every folder swap of
``fdfast.io.publish_dir`` (after the old copy went aside: FLAGS/swap-1; after the new one went in, the old one not
yet removed: FLAGS/swap-2), so that a test can signal it exactly there. Only the timing changes: the renames are
fdfast's own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class GroupRun:
    """A command started in its own session; stdout / stderr go to files (no pipe that fills up)."""

    def __init__(self, argv: list[str], log_dir: str | Path, env: dict | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.argv = list(argv)
        with open(self.log_dir / "stdout.txt", "wb") as out, open(self.log_dir / "stderr.txt", "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, start_new_session=True,
                                         env={**os.environ, **(env or {})})
        self.pgid = self.proc.pid

    @property
    def stdout(self) -> str:
        return (self.log_dir / "stdout.txt").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.log_dir / "stderr.txt").read_text(errors="replace")

    def wait_for(self, ready, timeout: float = 180.0, poll: float = 0.05) -> None:
        """Poll ready() until true; fails (with the log) if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[:4]} ended (rc {self.proc.returncode}) before the marker:\n"
                                     f"{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no marker after {timeout}s:\n{self.stderr[-3000:]}")
            time.sleep(poll)

    def catches(self, sig: int) -> bool:
        """Whether the main process has a handler for ``sig`` (SigCgt in /proc/PID/status: a bit mask of signals
        1..64). Before `python -m fdfast` installs one (the first lines of `fdfast.cli.main`) the interpreter is
        still starting, and the kernel's default action ends it by the signal: no program can answer a SIGTERM that
        early, so a test of start-up SIGTERM waits for this."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        except OSError:  # the process is gone
            pass
        return False

    def killpg(self, sig: int) -> None:
        """The signal to every process of the group (the scheduler's way)."""
        os.killpg(self.pgid, sig)

    def killpg_tree(self, sig: int) -> list[int]:
        """The signal to the group AND to the group of every descendant that left it (torchrun starts each
        rank in its own session): the "every process of the job" delivery of SLURM or a container stop.
        Returns the groups signalled."""
        groups = [self.pgid] + sorted({os.getpgid(p) for p in descendants(self.proc.pid)} - {self.pgid})
        for g in groups:
            os.killpg(g, sig)
        return groups

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout}s after the signal:\n{self.stderr[-3000:]}") from None

    def group_alive(self, grace: float = 10.0) -> bool:
        """Whether any process of the group is still there after `grace` seconds (workers left behind)."""
        deadline = time.monotonic() + grace
        while True:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the group (cleanup after a failed test)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def descendants(pid: int) -> list[int]:
    """All living descendants of pid (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name in () may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def metrics_lines(out_dir: str | Path) -> int:
    """Lines in out_dir/metrics.jsonl (0 before it exists): the "run is mid-way" marker."""
    try:
        return len((Path(out_dir) / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


# ----------------------------------------------------------------------------- pausing inside a folder swap
def pause_swaps_argv(argv: list[str], flags: str | Path, pause_s: float) -> list[str]:
    """``argv`` (``python -m fdfast ...``) run through this file's pause-swaps mode."""
    assert argv[1:3] == ["-m", "fdfast"], argv
    return [argv[0], str(Path(__file__).resolve()), "pause-swaps", str(flags), str(pause_s), "--", *argv[3:]]


def _pause_swaps(flags: Path, pause_s: float) -> None:
    """Wrap os.rename: after each rename that makes a swap's state (an aside copy beside its final folder), write
    the next FLAGS/swap-N and sleep ``pause_s`` seconds (signals are handled meanwhile, as anywhere)."""
    real, count = os.rename, [0]

    def rename(src, dst, *a, **k):
        real(src, dst, *a, **k)
        dst = Path(dst)
        aside = dst if dst.name.endswith(".replaced") else dst.with_name(f".{dst.name}.replaced")
        if aside.exists():
            count[0] += 1
            flags.mkdir(parents=True, exist_ok=True)
            (flags / f"swap-{count[0]}").touch()
            time.sleep(pause_s)
    os.rename = rename


if __name__ == "__main__" and sys.argv[1:2] == ["pause-swaps"]:
    import runpy
    _, _, flag_dir, pause, sep, *rest = sys.argv
    assert sep == "--"
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # this folder, put first by `python FILE`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fdfast of this checkout, as `python -m` does
    _pause_swaps(Path(flag_dir), float(pause))
    sys.argv = ["fdfast", *rest]
    runpy.run_module("fdfast", run_name="__main__", alter_sys=True)
