"""What a run reports while it runs: metrics.jsonl + a tracker (``MetricsLog``) and the terminal (``Progress``).

Both are written by rank 0 only; other ranks get disabled instances, so the loop calls them unconditionally.
A write that fails (a full disk, an I/O error, a read-only file system) is ``fdfast.io.WriteFailed`` naming the
file, raised in the calling thread (the loop turns it into one line).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import sys
import time
import typing
from pathlib import Path

from fdfast.config import Tracker
from fdfast.io import WriteFailed, atomic_write_text, fsync_file, writing

_EVENT_FILES = itertools.count()  # unique event file names within one process


class EventFile:
    """TensorBoard scalars in one events file (tensorboard's own record format and protos), written synchronously.

    torch's SummaryWriter writes from a background thread, which turns a failed write into a thread traceback
    and a later, unrelated error; here each row is written and flushed by the caller, so a full disk is one
    WriteFailed at the row that hit it. ``purge_step``: TensorBoard drops the events an earlier writer in the same
    folder logged from that step on (a resumed run's rows past its checkpoint), as SummaryWriter(purge_step) does.
    """

    def __init__(self, folder: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter
        self.Event = Event
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_EVENT_FILES)}")
        self.path = Path(folder) / name
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "wb")
        self.records = RecordWriter(self.file)
        try:
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if purge_step is not None:
                self._write(Event(wall_time=time.time(), step=purge_step,
                                  session_log=SessionLog(status=SessionLog.START)))
        except WriteFailed:
            with contextlib.suppress(OSError):  # closed now: a failing flush at garbage collection would print
                self.file.close()
            raise

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=f"{prefix}/{k}", simple_value=float(v)) for k, v in values.items()])
        self._write(self.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event) -> None:
        with writing(self.path):
            self.records.write(event.SerializeToString())
            self.file.flush()

    def sync(self) -> None:
        with writing(self.path):
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            with writing(self.path):
                self.file.close()  # the file is closed even when its last flush fails


class MetricsLog:
    """DIR/metrics.jsonl (one JSON object per logged step) + the same numbers in a tracker (``runtime.tracker``):
    TensorBoard scalars under DIR/tb, or a Weights & Biases run (``fdfast.trackers``, with ``config`` and, at
    ``finish``, the run summary), or neither.

    On resume, rows a crashed run logged after the checkpoint it resumes from are dropped (the file is rewritten
    atomically), so the file never holds a step twice; TensorBoard purges the same steps. ``sync()`` puts the rows
    on disk (the loop calls it before a checkpoint commits, so a committed step never lacks its rows).
    """

    def __init__(self, out_dir: Path | None, resume_step: int, tracker: str, enabled: bool = True,
                 prefix: str = "train", config: dict | None = None, command: str = "fdfast train"):
        if tracker not in typing.get_args(Tracker):
            raise ValueError(f"tracker must be one of {typing.get_args(Tracker)}, got {tracker!r}")
        self.enabled = enabled and out_dir is not None
        self.prefix, self.events, self.wandb = prefix, None, None
        if not self.enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tracker == "tensorboard":
            self.events = EventFile(Path(out_dir) / "tb", purge_step=resume_step + 1)
        elif tracker == "wandb":
            from fdfast.trackers import WandbTracker
            self.wandb = WandbTracker(Path(out_dir), config or {}, command, prefix)

    @staticmethod
    def check(tracker: str) -> None:
        """The tracker's package is there (W&B is an optional extra), or one FDFastError naming the extra."""
        if tracker == "wandb":
            from fdfast.trackers import import_wandb
            import_wandb()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path):
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items()  # None: a loss of steps that were all skipped
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.events is not None:
            self.events.scalars(row["step"], numbers, self.prefix)
        if self.wandb is not None:
            self.wandb.log(row["step"], numbers)

    def sync(self) -> None:
        """The rows logged so far on disk (fsync)."""
        if not self.enabled:
            return
        if self.path.exists():
            with writing(self.path):
                fsync_file(self.path)
        if self.events is not None:
            self.events.sync()

    def last(self, key: str):
        """``key`` of the newest row that has it (None: no such row)."""
        if not self.enabled or not self.path.exists():
            return None
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        return next((r[key] for r in reversed(rows) if key in r), None)

    def close(self, failed: bool = False) -> None:
        """Close the TensorBoard file. A W&B run stays open for ``finish`` unless the run ``failed`` (then it is
        finished as failed here)."""
        try:
            if self.events is not None:
                events, self.events = self.events, None
                events.close()
        finally:
            if failed and self.wandb is not None:
                self.wandb.finish(None)

    def finish(self, summary: dict) -> None:
        """The end of a run that finished: its summary to the tracker that keeps one (W&B), which is then closed."""
        if self.wandb is not None:
            self.wandb.finish(summary)


class Progress:
    """A tqdm bar (loss, lr, img/s, ETA) on a terminal; one plain line per logged step otherwise (CI logs)."""

    def __init__(self, desc: str, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.start = self.last = start

    def update(self, step: int, row: dict, loss_key: str = "loss") -> None:
        if not self.enabled:
            return
        extra = "".join(f"  {k} {row[k]:.2f}" for k in ("top1", "top5") if k in row)
        loss = "n/a" if row[loss_key] is None else f"{row[loss_key]:.4f}"  # None: every step since the last row skipped
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=loss, lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}")
            if extra:
                self.bar.write(f"step {step}/{self.total}{extra}")
        else:
            eta = row["elapsed_s"] / max(step - self.start, 1) * (self.total - step)
            epoch = f"epoch {row['epoch']}  " if "epoch" in row else ""
            print(f"{self.desc} {epoch}step {step}/{self.total}  loss {loss}  lr {row['lr']:.2e}  "
                  f"{row['img_per_s']:.1f} img/s{extra}  {row['elapsed_s']:.0f}s  eta {eta:.0f}s",
                  file=sys.stderr, flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
