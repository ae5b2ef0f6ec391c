"""`fdfast train`, and the loop every run shares (FD and fine-tuning), readable top to bottom.

    with signals.StopRequest(...) as stop:     # set-up: SIGINT / SIGTERM end the run at once (exit 130)
        rt = runtime.resolve(cfg.runtime)      # device, ranks, precision (the CLI also applies process settings)
        with RunDir(out, resume, rt.info, "fdfast train") as run_dir:   # lock, repair, resume choice before any work
            run = build_fd_run(cfg, rt)        # fdfast.run: every part, built in one place
            summary = fit(run, run_dir, stop=stop)   # steps, logs, evaluations, checkpoints, a stop after a step

``fit`` is the loop: ``fdfast.step.train_step`` per step, a metrics row every ``log_every`` steps (with an
evaluation where the run has one), a committed checkpoint every ``ckpt_every`` steps (``fdfast.checkpointer``),
and on a stop signal the step reached is committed and the run exits 130. Everything that can be wrong with the
input (config, teacher weights, data folder) is checked while the run is built, before the run directory is
written, so a failed start never overwrites what a previous run wrote. A write that fails (a full disk, an I/O
error, a read-only file system) ends the run with one line naming the file and the newest intact checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from fdfast import checkpoint as ckpt
from fdfast import distributed, runtime, signals
from fdfast.checkpointer import Checkpointer, checkpoint_format
from fdfast.config import Config, add_run_arguments, config_from_cli, load_config, validate
from fdfast.errors import FDFastError
from fdfast.io import WriteFailed, atomic_write_json, atomic_write_text, run_dir_lock
from fdfast.metrics import MetricsLog, Progress
from fdfast.step import train_step

DIVERGED_STEPS = 3  # non-finite steps in a row that end a run (its committed checkpoints stay)


# ----------------------------------------------------------------------------- the run directory
class RunDir:
    """A run directory from start to end. On entry (before any work): an existing directory is locked at once, so
    a second process stops here, and what a killed run left half-done is repaired (``checkpoint.recover``, named
    in one line); ``--resume`` is resolved (rank 0 verifies, every rank gets its answer); a directory holding a run
    is refused without ``--resume``. ``open(config_yaml)`` creates and locks a new directory, starts the branch a
    resume continues (later steps of another branch move out of the way, named in one line) and writes
    config.yaml, once the run has been built. A write that fails inside the block leaves it as one FDFastError
    naming the file and the newest intact checkpoint. ``path=None``: a run without files (benches)."""

    def __init__(self, path, resume: str | None, info: distributed.DistInfo, command: str):
        self.path = Path(path) if path is not None else None
        self.resume, self.info, self.command = resume, info, command
        self.resume_from: Path | None = None
        self.branch = 0  # the lineage this run commits to (fdfast.checkpoint)
        self.resumed: dict | None = None  # where it resumed from, for summary.json
        self._lock = contextlib.ExitStack()

    def __enter__(self) -> "RunDir":
        try:
            self._enter()
        except BaseException as e:  # the lock is released, a failed write is one line
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _enter(self) -> None:
        if self.path is None:
            return
        main = self.info.is_main
        if main and self.path.is_dir():  # an existing run: a second process stops here, before any work
            self._lock.enter_context(run_dir_lock(self.path, self.command))
            for done in ckpt.recover(self.path):
                self._say(f"{self.path}: {done}")
        found = ckpt.resolve_resume(self.path, self.resume) if main else None  # rank 0 reads every byte once
        self.resume_from = distributed.all_gather_object(found, self.info)[0]
        # --resume auto on a run stopped before its first checkpoint starts it over: nothing committed, nothing lost
        restart = self.resume == "auto" and not ckpt.committed_steps(self.path)
        if self.resume_from is None and main and self._holds_a_run() and not restart:
            raise FDFastError(self._no_resume())
        if self.resume_from is not None:
            self.resumed = {"path": str(self.resume_from)}

    def open(self, config_yaml: str) -> None:
        """Input is valid: the directory may be written (rank 0 creates and locks it, starts the resumed branch,
        writes config.yaml)."""
        if self.path is None or not self.info.is_main:
            return
        if not self._lock._exit_callbacks:  # a new run dir: created and locked only now
            self._lock.enter_context(run_dir_lock(self.path, self.command))
            if self.resume_from is None and self._holds_a_run():  # another process started a run here meanwhile
                raise FDFastError(self._no_resume())
        if self.resume_from is not None:
            self._continue_branch()
        else:
            self.branch = ckpt.branch_of(self.path, None)
            if self.resume == "auto":
                self._say(f"--resume auto: {self.path} has no committed checkpoint yet; starting at step 0")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)  # a kill mid-write leaves the old one

    def _continue_branch(self) -> None:
        """One line naming the checkpoint resumed from; committed steps after it leave the current branch."""
        src = self.resume_from
        why = "--resume auto skipped damaged newer steps" if self.resume == "auto" else f"--resume {self.resume}"
        self.branch, folder, moved = ckpt.start_branch(self.path, src, why)
        step, branch = ckpt.marker_field(src, "step", None), ckpt.marker_field(src, "branch")
        self._say(f"resuming from {src} (step {step}, branch {branch})")
        if folder is not None:
            self._say(f"step{'s' * (len(moved) > 1)} {', '.join(map(str, moved))} (after step {step}) left the "
                      f"current branch: moved with the run's final files to {folder}/; this run continues as "
                      f"branch {self.branch}")
        self.resumed = {"path": str(src), "step": step, "branch": branch, "continues_as_branch": self.branch,
                        "abandoned": str(folder) if folder is not None else None}

    def __exit__(self, exc_type, exc, tb) -> None:
        self._lock.close()
        if isinstance(exc, WriteFailed):  # one line: the file, where the run can continue from, the fix
            raise FDFastError(f"{exc}; {ckpt.where_to_resume(self.path)}: {exc.fix}, then --resume auto") from None

    def _say(self, line: str) -> None:
        print(f"{self.command}: {line}", file=sys.stderr, flush=True)

    def _holds_a_run(self) -> bool:
        return any((self.path / n).exists() for n in ("config.yaml", "checkpoints"))

    def _no_resume(self) -> str:
        if self.resume is None:
            return f"{self.path} already holds a run; pass --resume auto to continue it, or choose a new --out"
        return f"{self.path} holds a run but no intact committed checkpoint to resume from; choose a new --out"


# ----------------------------------------------------------------------------- the loop
def fit(run, run_dir: RunDir, on_step=None, stop: signals.StopRequest | None = None) -> dict:
    """Drive ``run`` (fdfast.run.Run) to its last step; returns the summary (also DIR/summary.json).
    ``on_step(result)``: called after every step (benches time steps with it). ``stop``: the caller's StopRequest
    (in its set-up phase); without one, fit installs its own and puts the previous handlers back at the end."""
    if stop is not None:
        return _fit(run, run_dir, on_step, stop)
    with signals.StopRequest(run.command, announce=run.rt.info.is_main, phase="setup") as own:
        return _fit(run, run_dir, on_step, own)


def _fit(run, run_dir: RunDir, on_step, stop: signals.StopRequest) -> dict:
    cfg, info, out = run.cfg, run.rt.info, run_dir.path
    checkpointer = Checkpointer(out, info, checkpoint_format(cfg.ckpt.format, cfg.dist.strategy, info.world_size),
                                cfg.ckpt.keep, cfg.ckpt.async_save, cfg.dist.strategy, run.command)
    start = 0
    if run_dir.resume_from is not None:
        start = _load(checkpointer, run, run_dir.resume_from)
    if info.is_main and out is not None:
        MetricsLog.check(cfg.runtime.tracker)  # a missing tracker package: one line before anything is written
    stop.check_setup()  # nothing is written before this point
    run_dir.open(cfg.to_yaml())
    checkpointer.set_branch(run_dir.branch)
    if out is not None and run.start is not None:
        run.start(out)
    if info.is_main and out is not None:  # printed once the run really starts, so a refused start stays one line
        print(f"{run.command}: precision {run.rt.precision['precision']} ({run.rt.precision['why']}); "
              f"{run.batch_line()}", file=sys.stderr)
    metrics = MetricsLog(out, start, cfg.runtime.tracker, info.is_main, config=cfg.to_dict(), command=run.command)
    progress = Progress(run.command.split()[-1], run.total_steps, start, info.is_main and cfg.runtime.progress)
    run.task.train()
    t_run = t_log = time.perf_counter()
    images, diverged, skipped, loss_sum, loss_n, last_loss = 0, 0, 0, 0.0, 0, None
    done = saved = start
    r = None
    stop.begin_steps()  # from here a signal stops after a step, which is committed
    try:
        for step in range(start + 1, run.total_steps + 1):
            if r is not None and r.stop:  # all ranks agreed in the last step: commit it (once), then exit 130
                if saved != done:
                    metrics.sync()
                    checkpointer.save(done, run, _loop_state(run), run.meta)
                raise KeyboardInterrupt(f"stopped by {stop.name} after step {done} (committed)")
            r = run.compiler.run(lambda: train_step(run, run.loader, step, stop.requested),
                                 steps_left=run.total_steps - step)
            images, done = images + r.images, step
            if on_step is not None:
                on_step(r)
            if r.skipped:  # no update; a run that keeps diverging stops with its checkpoints intact
                skipped, diverged = skipped + 1, diverged + 1 if r.diverged else 0
                if diverged >= DIVERGED_STEPS:
                    raise FDFastError(f"loss is {r.loss} for {DIVERGED_STEPS} steps in a row (step {step}); last "
                                      f"committed checkpoint: {out and ckpt.latest_committed(out)}; lower "
                                      f"optim.base_lr or use runtime.precision=bf16/fp32")
            else:
                diverged, loss_sum, loss_n = 0, loss_sum + r.loss, loss_n + 1

            evaluate = run.eval_every and (step % run.eval_every == 0 or step == run.total_steps)
            log_due = loss_n and (step % run.log_every == 0 or step == run.total_steps)  # rows only of updates
            if evaluate or log_due:
                now = time.perf_counter()
                row = {"step": step, run.loss_key: loss_sum / loss_n if loss_n else None,  # None: all skipped
                       "lr": max(g["lr"] for g in run.optimizer.param_groups), "img_per_s": images / (now - t_log),
                       "grad_norm": r.grad_norm}
                if evaluate:
                    row.update(run.evaluator(step, run.task.trained_model(), run.ema, run.rt.autocast))
                row["elapsed_s"] = time.perf_counter() - t_run
                metrics.log(row)  # before the commit: a resume drops rows past its checkpoint, never misses one
                progress.update(step, row, run.loss_key)
                last_loss = row[run.loss_key]
                t_log, images, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            if run.ckpt_every and step % run.ckpt_every == 0 and step != run.total_steps:
                metrics.sync()  # the rows this checkpoint covers are on disk before it is
                checkpointer.save(step, run, _loop_state(run), run.meta)
                saved = step
    finally:
        try:
            checkpointer.wait()  # commit a DCP save still being written (after a stop or an error, too)
        finally:  # an error while closing is raised only when no other one is on its way
            failing = sys.exc_info()[1] is not None
            _close_all(failing, progress.close, lambda: metrics.close(failed=failing))

    stop.finishing()  # the last step is done: a signal now lets the final files be written
    if out is not None:
        checkpointer.save(run.total_steps, run, _loop_state(run), run.meta)
        checkpointer.wait()
    tensors = checkpointer.model_tensors(run) if out is not None else None
    wall = time.perf_counter() - t_run
    summary = dict(run.loader.stats(), steps=run.total_steps - start, wall_s=round(wall, 3),
                   img_per_s=round(run.loader.images_seen / wall, 2) if wall > 0 and info.is_main else None,
                   final_loss=last_loss, skipped_steps=skipped, resumed_from=run_dir.resumed,
                   **run.rt.precision, compile=run.compiler.summary(), malloc=run.rt.malloc)
    if info.is_main and out is not None:
        if run.eval_every:
            summary["last_top1"] = metrics.last("top1")
        summary = run.finish(run, out, tensors, summary)
        atomic_write_json(out / "summary.json", summary, indent=2)
        metrics.finish(summary)  # a W&B run gets the summary and ends
    run.loader.close()
    distributed.shutdown()
    return summary


def _close_all(failing: bool, *closers) -> None:
    """Call every closer; the first error is raised afterwards unless another error is already on its way."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - kept for after the others ran
            first = first or e
    if first is not None and not failing:
        raise first


def _loop_state(run) -> dict:
    """What the loop itself keeps in a checkpoint besides the tensors (the checkpointer adds step, RNG, optimizer)."""
    return {"command": run.command, "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "loader": run.loader.state_dict(), "config": run.cfg.to_dict(),
            "evaluator": run.evaluator.state_dict() if run.evaluator is not None else None}


def _load(checkpointer: Checkpointer, run, path: Path) -> int:
    """Continue ``run`` where the checkpoint at ``path`` left it (exactly, on the world size that saved it)."""
    state = checkpointer.load(path, run)
    if run.evaluator is not None and state.get("evaluator"):
        run.evaluator.load_state_dict(state["evaluator"])
    return int(state["step"])


def setup_signals(command: str) -> signals.StopRequest:
    """The StopRequest of a library call, from its first line: until the loop starts, SIGINT / SIGTERM end the call
    at once (KeyboardInterrupt; exit 130 at the command line); use it as a context manager (handlers put back)."""
    return signals.StopRequest(command, announce=int(os.environ.get("RANK", "0")) == 0, phase="setup")


# ----------------------------------------------------------------------------- FD
def train(cfg: Config, out_dir: str | Path | None, resume: str | None = None) -> dict:
    """Run FD for cfg.optim.steps optimizer steps; returns the run summary (also in DIR/summary.json).

    A library call: it changes no process-wide setting (``fdfast.runtime.apply`` is the command line's), and
    puts back the signal handlers it installs. Rank 0 holds the run directory's lock from start to end."""
    from fdfast.run import build_fd_run
    with setup_signals("fdfast train") as stop:
        validate(cfg)
        rt = runtime.resolve(cfg.runtime)
        stop.announce = rt.info.is_main
        with RunDir(out_dir, resume, rt.info, "fdfast train") as run_dir:
            return fit(build_fd_run(cfg, rt), run_dir, stop=stop)


# ----------------------------------------------------------------------------- CLI
FLAG_KEYS = {"steps": "optim.steps", "data": "data.path", "teacher": "teacher.name",
             "teacher_weights": "teacher.weights", "batch_size": "data.batch_size", "device": "runtime.device"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distill a teacher into a student (default recipe: the CPU demo)",
                              description="Feature Distillation training. RECIPE is a name from fdfast/recipes or a YAML file.")
    p.add_argument("recipe", nargs="?", default="demo", help="recipe name or YAML path (default: demo)")
    p.add_argument("--out", help="run directory (default: runs/<recipe>)")
    p.add_argument("--steps", type=int, help="optimizer steps of the whole run")
    p.add_argument("--data", help="image folder (class subfolders or flat)")
    p.add_argument("--teacher", help="teacher registry name or timm model name")
    p.add_argument("--teacher-weights", help="local teacher weights file")
    p.add_argument("--batch-size", type=int, help="images per device per micro-step")
    add_run_arguments(p)
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> tuple[Config, Path]:
    return config_from_cli(args, FLAG_KEYS, Config, load_config, f"runs/{Path(args.recipe).stem}")


def run_cli(args: argparse.Namespace) -> int:
    cfg, out = config_from_args(args)
    runtime.apply(cfg.runtime)  # the process-wide settings, here at the edge (glibc malloc on CPU runs)
    summary = train(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fdfast train: {summary['steps']} steps in {summary['wall_s']:.0f}s "
              f"({summary['img_per_s'] or 0:.1f} img/s) -> {out / 'student.safetensors'}")
    return 0
