"""Weights & Biases beside metrics.jsonl (``runtime.tracker=wandb``): the same scalar rows, the config, the summary.

W&B is an optional extra (``pip install 'fdfast[wandb]'``); TensorBoard events are written by ``fdfast.metrics``
itself. Only rank 0 makes a tracker (``MetricsLog`` is disabled on the other ranks).

- Mode: with no API key (``WANDB_API_KEY``, or a ``~/.netrc`` entry for the W&B host) and no ``WANDB_MODE``, the
  run is logged offline, ready for ``wandb sync``; a key or ``WANDB_MODE`` leaves the choice to wandb.
- Files: everything wandb writes for the run lies under DIR/wandb (its run folder, and its cache, data and
  artifact folders unless the user set ``WANDB_CACHE_DIR`` / ``WANDB_DATA_DIR`` / ``WANDB_ARTIFACT_DIR``).
- Resume: the W&B run id is kept in DIR/wandb-run-id, so a resumed fdfast run continues the same W&B run (W&B
  keeps the rows it holds and ignores logged steps that are not past its last one, as after an explicit resume to
  an earlier step). Offline, each process writes its own offline-run-* folder under that one id.
"""
from __future__ import annotations

import contextlib
import netrc
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

from fdfast.errors import FDFastError
from fdfast.io import atomic_write_text

RUN_ID_FILE = "wandb-run-id"  # in the run directory: the W&B run id every (resumed) process of the run logs to
WANDB_FOLDERS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}


def import_wandb():
    """The wandb module, or one FDFastError naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise FDFastError("runtime.tracker=wandb needs the wandb package: pip install 'fdfast[wandb]' "
                          "(or choose runtime.tracker=tensorboard or none)") from None
    return wandb


def has_credentials() -> bool:
    """Whether wandb would find an API key: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no netrc (the usual case here) or one wandb could not read either
        return False


def wandb_mode() -> str | None:
    """``"offline"`` when the user neither chose a mode nor has a key; None leaves the choice to wandb."""
    return None if os.environ.get("WANDB_MODE") or has_credentials() else "offline"


def run_id(out_dir: Path) -> str:
    """The run directory's W&B run id, made and written on first use."""
    path = Path(out_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    new = uuid.uuid4().hex[:12]
    atomic_write_text(path, new + "\n")
    return new


@contextlib.contextmanager
def _folders_inside(root: Path):
    """wandb's cache / data / artifact folders under ``root`` while a run starts (its service process takes them
    from the environment when it starts), unless the user set them; the environment is put back afterwards."""
    added = {name: str(root / sub) for name, sub in WANDB_FOLDERS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class WandbTracker:
    """One W&B run per fdfast run directory: ``log(row)`` per metrics row, ``finish(summary)`` at the end."""

    def __init__(self, out_dir: Path, config: dict, command: str, prefix: str = "train"):
        wandb = import_wandb()
        out_dir = Path(out_dir)
        self.prefix, self.command, self.run = prefix, command, None
        rid, mode = run_id(out_dir), wandb_mode()
        settings = wandb.Settings(console="off", silent=True)  # fdfast prints its own lines; stdout is not wrapped
        try:
            with _folders_inside(out_dir / "wandb"):
                # create_new: a run the caller has open in this process stays open and is not returned instead
                self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "fdfast", dir=str(out_dir),
                                      id=rid, resume="allow", name=out_dir.name, config=config, mode=mode,
                                      job_type=command.split()[-1], reinit="create_new", settings=settings)
        except wandb.errors.Error as e:
            raise FDFastError(f"W&B could not start run {rid} ({' '.join(str(e).split())}); fix the W&B set-up, "
                              f"set WANDB_MODE=offline, or choose runtime.tracker=tensorboard") from None
        chosen = self.run.settings.mode
        if chosen in ("offline", "dryrun"):
            where = f"logged offline in {Path(self.run.dir).parent} (upload: wandb sync {out_dir / 'wandb'}/offline-run-*)"
        else:
            where = "not logged (WANDB_MODE=disabled)" if chosen == "disabled" else f"at {self.run.url}"
        print(f"{command}: W&B run {rid} {where}", file=sys.stderr, flush=True)

    def log(self, step: int, values: dict) -> None:
        """One metrics row's numbers, under ``prefix/`` as in TensorBoard, at fdfast's optimizer step."""
        self.run.log({f"{self.prefix}/{k}": v for k, v in values.items()}, step=step)

    def finish(self, summary: dict | None = None) -> None:
        """The run summary into W&B's summary, then the run finished (exit code 0); None: the run failed (1)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        if summary is not None:
            run.summary.update(summary)
        run.finish(exit_code=0 if summary is not None else 1)
