"""Preemption as schedulers send it: SIGTERM / SIGINT to the whole process group commit the current step.

The end-to-end tests start `fdfast train` in its own session and signal its process group mid-run
(tests/helpers_signals.py): main process, DataLoader workers, DALI's threads, torchrun and every rank all get
the signal. Each interrupted run must exit 130 with no traceback, leave exactly one COMMITTED checkpoint, at
the step it reached, and no process behind; `--resume auto` must then end bitwise equal to a run that was
never interrupted.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fdfast import checkpoint as ckpt
from fdfast import signals
from fdfast.config import DataConfig
from fdfast.data import build_fd_loader, dali_available
from helpers_signals import GroupRun, metrics_lines
from test_train import tiny_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 120  # enough steps after the trigger that a signal lands mid-run even on a quiet, fast machine (~3 ms a step)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# -- the parts ------------------------------------------------------------------------------------
def test_first_signal_asks_a_quick_repeat_is_the_same_request_a_later_one_aborts(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    before = signal.getsignal(signal.SIGTERM)
    with signals.StopRequest("test", announce=False) as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        clock[0] += signals.REPEAT_WINDOW_S / 2  # the group's signal and torchrun's forward of it
        signal.raise_signal(signal.SIGINT)
        assert stop.name == "SIGTERM"
        clock[0] += signals.REPEAT_WINDOW_S
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_reduce_step_in_a_world_of_one_passes_through():
    from fdfast.distributed import DistInfo, reduce_step
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert reduce_step(t(1.5), t(0.5), True, DistInfo()) == (1.5, 0.5, True)
    assert reduce_step(t(2.0), t(3.0), False, DistInfo()) == (2.0, 3.0, False)


def _loader(image_dir, kind, workers=1):
    cfg = DataConfig(path=str(image_dir), loader=kind, num_workers=workers)
    return build_fd_loader(cfg, image_size=32, mean=MEAN, std=STD, batch_size=4, seed=3)


def test_torch_loader_workers_ignore_stop_signals(image_dir):
    """A worker that gets the group's SIGTERM / SIGINT keeps serving: shutdown is the main process's call."""
    loader = _loader(image_dir, "torch", workers=1)
    first = next(loader)
    worker = loader._iter._workers[0]
    for sig in (signal.SIGTERM, signal.SIGINT):  # from another process, as a scheduler sends them
        subprocess.run(["kill", f"-{sig.name[3:]}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive() and worker.exitcode is None
    more = [next(loader) for _ in range(4)]  # 5 batches: past the 3 of an epoch and the prefetched ones
    assert torch.equal(first, next(_loader(image_dir, "torch", workers=0)))
    assert all(b.shape == (4, 3, 32, 32) for b in more)
    os.kill(worker.pid, signal.SIGTERM)  # the main process's own SIGTERM (DataLoader.terminate()) still ends it
    worker.join(5)
    assert worker.exitcode == 0
    loader.close()


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_crops_come_from_the_sample_seeds_so_resume_is_exact(image_dir):
    """Resumed at a saved position, DALI yields bitwise the batches the uninterrupted loader yields next; and
    its crop windows are the torch loader's (same seeds), so the two loaders' batches nearly agree."""
    a = _loader(image_dir, "dali")
    for _ in range(2):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    b = _loader(image_dir, "dali")
    b.load_state_dict(state)
    assert all(torch.equal(next(b), e) for e in expected)
    t = _loader(image_dir, "torch", workers=0)
    t.load_state_dict(state)
    for e in expected:  # same windows and flips; only the resize implementations differ (normalised units)
        assert (next(t) - e).abs().mean() < 0.1


# -- end to end: `fdfast train` in its own session, signals to the whole group --------------------------
def _train_argv(out, teacher_file, image_dir, loader, *extra):
    return [sys.executable, "-m", "fdfast"] + tiny_args(
        out, teacher_file, image_dir, STEPS, "--set", f"data.loader={loader}", "--set", "data.num_workers=1",
        "--set", "ckpt.every=0", *extra)


def _interrupt(argv, out, sig, after_lines, log_dir, group=GroupRun.killpg, env=None):
    """Start argv in its own session, signal its group once metrics.jsonl has after_lines lines; the step
    committed. Checks the exit code, the one-line ending and that no process of the group is left."""
    run = GroupRun(argv, log_dir, env)
    try:
        run.wait_for(lambda: metrics_lines(out) >= after_lines)
        group(run, sig)
        rc = run.wait()
    finally:
        if run.proc.poll() is None:
            run.kill()
    err = run.stderr
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not run.group_alive(), "a worker outlived the run"
    committed = [s for s, _ in ckpt.committed_steps(out)]
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert committed and committed[-1] == logged[-1] >= after_lines  # the step reached, nothing after it
    assert f"stopped by {signal.Signals(sig).name} after step {committed[-1]} (committed)" in err
    return committed[-1]


def _same_student(a, b):
    assert (a / "student.safetensors").read_bytes() == (b / "student.safetensors").read_bytes()


def _run(argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=[pytest.mark.slow, pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali not installed")])])
def test_group_sigterm_then_sigint_commit_and_resume_bitwise(tmp_path, teacher_file, image_dir, loader):
    """SIGTERM to the group, resume, SIGINT to the group, resume: the student equals an unbroken run's."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_train_argv(ref, teacher_file, image_dir, loader))
    first = _interrupt(_train_argv(cut, teacher_file, image_dir, loader), cut, signal.SIGTERM, 3, tmp_path / "l1")
    assert [s for s, _ in ckpt.committed_steps(cut)] == [first]
    resume = _train_argv(cut, teacher_file, image_dir, loader, "--resume", "auto")
    second = _interrupt(resume, cut, signal.SIGINT, first + 3, tmp_path / "l2")
    assert second > first and second < STEPS
    _run(resume)
    _same_student(ref, cut)


def _torchrun_argv(launcher, out, teacher_file, image_dir, *extra):
    argv = _train_argv(out, teacher_file, image_dir, "torch", "--set", "model.drop_path=0", *extra)
    argv[argv.index("--batch-size") + 1] = "2"  # 2 ranks x 2: the global batch of 4
    return [sys.executable, "-m", launcher, "--nproc_per_node", "2", "--standalone"] + argv[1:]


@pytest.mark.slow
def test_torchrun_ranks_stop_after_the_same_step_and_resume_bitwise(tmp_path, teacher_file, image_dir):
    """Two gloo ranks, each with a DataLoader worker. SIGTERM to every process of the job (torchrun's group and
    each rank's own session: every rank gets it twice, directly and forwarded), then SIGINT to torchrun's
    group only: both times the ranks agree on the step, it is committed once, the launcher exits 130."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run(_torchrun_argv("torch.distributed.run", ref, teacher_file, image_dir), env={**os.environ, **one_thread})
    first = _interrupt(_torchrun_argv("fdfast.launch", cut, teacher_file, image_dir), cut, signal.SIGTERM, 3,
                       tmp_path / "l1", group=GroupRun.killpg_tree, env=one_thread)
    assert [s for s, _ in ckpt.committed_steps(cut)] == [first]
    resume = _torchrun_argv("fdfast.launch", cut, teacher_file, image_dir, "--resume", "auto")
    second = _interrupt(resume, cut, signal.SIGINT, first + 3, tmp_path / "l2", env=one_thread)
    assert first < second < STEPS
    _run(resume, env={**os.environ, **one_thread})
    _same_student(ref, cut)


@pytest.mark.slow
def test_plain_torchrun_commits_too_but_ends_with_its_own_code(tmp_path, teacher_file, image_dir):
    """What torchrun itself does with a group SIGTERM: it forwards it to each rank's group, the ranks commit
    the same step and exit 130, then torchrun re-raises the signal: exit 1 and a SignalException traceback
    (torch's code; `python -m fdfast.launch` turns that into exit 130)."""
    out = tmp_path / "run"
    run = GroupRun(_torchrun_argv("torch.distributed.run", out, teacher_file, image_dir), tmp_path / "log",
                   env={"OMP_NUM_THREADS": "1"})
    try:
        run.wait_for(lambda: metrics_lines(out) >= 3)
        run.killpg(signal.SIGTERM)
        rc = run.wait()
    finally:
        if run.proc.poll() is None:
            run.kill()
    (step, _), = ckpt.committed_steps(out)
    assert rc == 1 and "SignalException" in run.stderr
    assert run.stderr.count(f"stopped by SIGTERM after step {step} (committed)") == 2  # both ranks, one step


# -- set-up: a signal before the first step ends the run at once, exit 130, nothing new written --------------------
def _raise_first(sig, real):
    def wrapper(*a, **k):
        signal.raise_signal(sig)  # as if the scheduler's signal arrived while this part was being built
        return real(*a, **k)
    return wrapper


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("stage", ["teacher", "loader", "run", "resume"])
def test_a_signal_during_set_up_exits_130_in_one_line_and_writes_nothing(tmp_path, teacher_file, image_dir, capsys,
                                                                         monkeypatch, sig, stage):
    from fdfast import checkpointer, data, distill, run as run_module
    from fdfast.cli import main
    out = tmp_path / "run"
    extra = ()
    if stage == "resume":  # a run with a committed step, resumed: its files stay as they were
        assert main(tiny_args(out, teacher_file, image_dir, 2)) == 0
        extra = ("--resume", "auto")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    capsys.readouterr()
    owner, name = {"teacher": (distill, "teacher_from_config"), "loader": (data, "build_fd_loader"),
                   "run": (run_module, "_compose"), "resume": (checkpointer.Checkpointer, "load")}[stage]
    monkeypatch.setattr(owner, name, _raise_first(sig, getattr(owner, name)))
    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    assert main(tiny_args(out, teacher_file, image_dir, 4, *extra)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"fdfast train: interrupted: stopped by {sig.name} during set-up, before the first step; "
                       f"nothing new was committed"), err
    assert "Traceback" not in "\n".join(err) and len(err) <= 2  # (a resume names its repair first, if any)
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == handlers
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    assert after.keys() - {out / ".lock"} == before.keys() - {out / ".lock"}
    assert all(after[p] == before[p] for p in before if p.name != ".lock")


def test_a_signal_while_a_finetune_is_set_up_exits_130_and_restores_the_handlers(tmp_path, monkeypatch):
    from fdfast.finetune import finetune, model
    from test_finetune import _cfg, _colour_set
    data = tmp_path / "data"
    _colour_set(data / "train")
    _colour_set(data / "val", per_class=2, seed=1)
    monkeypatch.setattr(model, "build_classifier", _raise_first(signal.SIGTERM, model.build_classifier))
    handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM during set-up, before the first step"):
        finetune(_cfg(data), "vit_tiny_patch16_224", tmp_path / "ft")
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == handlers and not (tmp_path / "ft").exists()


def test_a_signal_a_library_swallowed_still_ends_the_run_before_its_first_step():
    """Some libraries import optional parts under a bare ``except:``: a start-up or set-up signal's KeyboardInterrupt
    raised inside one is lost, so it is noted and raised again where the run starts and before its first step."""
    def swallowed():
        try:
            signal.raise_signal(signal.SIGTERM)
        except BaseException:  # noqa: BLE001 - what such a library does
            pass
    with signals.startup_interrupts():
        swallowed()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM during start-up"):
            signals.StopRequest("test", announce=False, phase="setup")
    with signals.StopRequest("test", announce=False, phase="setup") as stop:
        swallowed()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM during set-up, before the first step"):
            stop.begin_steps()
        stop.phase, stop.signum = "steps", None
        swallowed()  # in the steps phase a signal is a request, never an exception
        assert stop.requested


def test_a_signal_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch):
    """An exception thrown into an import breaks more than the import (torch's C++ start-up aborts, a pybind11
    module reports "initialization failed", CPython exits by SIGINT after an interrupted PyRun_*): a signal that
    lands in one is noted, the import finishes, and the run ends at its next check, before any work."""
    import importlib
    (tmp_path / "slow_import_a.py").write_text("import signal\nsignal.raise_signal(signal.SIGTERM)\nDONE = True\n")
    (tmp_path / "slow_import_b.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with signals.startup_interrupts():
        assert importlib.import_module("slow_import_a").DONE  # imported whole, no exception inside
        with pytest.raises(KeyboardInterrupt, match="SIGTERM during start-up"):
            signals.raise_deferred()
    with signals.StopRequest("test", announce=False, phase="setup") as stop:
        assert importlib.import_module("slow_import_b").DONE
        with pytest.raises(KeyboardInterrupt, match="SIGINT during set-up, before the first step"):
            stop.check_setup()


def test_the_command_lines_own_process_ignores_stop_signals_once_its_command_is_done():
    """`python -m fdfast` / the console script: after the command (files written, exit code decided) comes only the
    interpreter's exit, where a signal would turn a finished command into a kill by signal with no line (-15); a
    main() called with arguments (a test, a notebook) puts the previous handlers back instead."""
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        with signals.startup_interrupts():
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before
        with signals.startup_interrupts(exiting=True):
            pass
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in signals.STOP_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_group_sigterm_during_start_up_exits_130_in_one_line(tmp_path, teacher_file, image_dir):
    """The first second of `fdfast train` (imports, parsing): the command line's SIGTERM handler ends it as Ctrl-C."""
    out = tmp_path / "run"
    run = GroupRun(_train_argv(out, teacher_file, image_dir, "torch"), tmp_path / "log")
    run.wait_for(lambda: run.catches(signal.SIGTERM), timeout=120)  # fdfast's first lines ran (the CLI's handler)
    time.sleep(0.3)  # seconds: inside the slow imports (torch, timm) that follow
    run.killpg(signal.SIGTERM)
    rc = run.wait()
    err = run.stderr.strip().splitlines()
    assert rc == 130 and len(err) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert err[0].startswith("fdfast") and "interrupted: stopped by SIGTERM during " in err[0]
    assert not out.exists() and not run.group_alive()
