"""SIGINT / SIGTERM as schedulers send them: workers ignore them, the main process stops at a step boundary.

SLURM preemption, Kubernetes pod deletion, `timeout`, torchrun's shutdown and Ctrl-C in a terminal signal
every process of the job's process group, not only the main one. So:
- child processes and native threads fdfast starts (DataLoader workers and their forkserver, DALI's pipeline
  threads) are created inside `stop_signals_blocked()`, and worker processes then ignore both signals unless
  their own main process sends them (`ignore_stop_signals`, their init function): stopping is the main
  process's decision, and a worker that died first would crash the step in flight ("DataLoader worker ...
  is killed by signal: Terminated");
- the main process's `StopRequest` only notes the first signal; the training step folds that note into the
  all-reduce it does anyway (`fdfast.distributed.reduce_step`), so every rank stops after the same step,
  which is committed;
- a second signal aborts at once (KeyboardInterrupt), unless it repeats the first within REPEAT_WINDOW_S:
  that is one stop delivered twice (the group signal plus a launcher forwarding it to each rank);
- before the first step (imports, teacher conversion, loader start, building the run: `StopRequest`'s set-up
  phase and the CLI's `startup_interrupts`) a signal ends the process at once, as KeyboardInterrupt: exit 130,
  one line; everything set-up writes is atomic, so nothing is left that a resume would trust.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 2.0  # seconds: a second signal sooner than this is the first one delivered again


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGINT / SIGTERM in this thread while it starts processes or threads.

    Children inherit the signal mask (through fork and exec), so a signal sent to the group while a worker
    is still starting stays pending instead of killing it before its init takes charge of it; native threads
    keep them blocked for good, so the kernel delivers the signals to the main thread, where Python's handler
    runs. Signals that arrive in the meantime are delivered to this thread when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_forkserver() -> None:
    """Start multiprocessing's forkserver (if not running) with SIGINT / SIGTERM blocked for good.

    The server only ignores SIGINT itself, and a SIGTERM to the group would kill it; its workers then quit
    (they watch their parent) and the step in flight crashes. Blocked, the signals stay pending in the server.
    The resource tracker is started first and outside the block: starting it UNBLOCKS both signals in the
    calling thread (CPython's resource_tracker), and it ignores them itself.
    """
    from multiprocessing import forkserver, resource_tracker
    resource_tracker.ensure_running()
    with stop_signals_blocked():
        forkserver.ensure_running()


def ignore_stop_signals(worker_id: int | None = None, *, main_pid: int | None = None) -> None:
    """Init of a worker process (DataLoader's worker_init_fn): SIGINT / SIGTERM from the group are ignored.

    Call it with both signals still blocked (inherited from `stop_signals_blocked`): they stay blocked, and a
    daemon thread takes them with sigtimedwait, so none can arrive unjudged. SIGTERM sent by the main process
    (``main_pid``, default: the parent) or by the worker's parent is its DataLoader's terminate(): the worker
    exits at once, as torch's workers do. Anything else (a scheduler, ``kill`` of the group, Ctrl-C) is
    ignored. The thread also ends the worker once the main process is gone: a forkserver's worker is not the
    main process's child, so torch's own parent watch cannot see that.
    """
    main_pid = main_pid or os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # new threads inherit it: all of them block
    threading.Thread(target=_judge_stop_signals, args=(main_pid,), name="fdfast-worker-signals", daemon=True).start()


def _judge_stop_signals(main_pid: int) -> None:
    allowed = {main_pid, os.getppid()}  # who may terminate this worker
    while True:
        info = signal.sigtimedwait(STOP_SIGNALS, 1.0)  # seconds
        if info is None:
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)  # the main process is gone: nobody will read this worker's batches
        elif info.si_signo == signal.SIGTERM and info.si_pid in allowed:
            os._exit(0)


class StopRequest:
    """SIGINT / SIGTERM for one run, in three phases (``phase``):

    - "setup" (from creation until ``begin_steps()``): a signal aborts at once (KeyboardInterrupt: exit 130 at the
      command line, one line, no traceback); what set-up writes is atomic, so nothing is left that a resume trusts;
    - "steps": the first signal asks the loop to stop after the step in flight (no update cut in half), which is
      committed; a second one, REPEAT_WINDOW_S or more later, interrupts at once;
    - "final" (``finishing()``, the last step is done): the first signal lets the final files be written.

    Use as a context manager (or call restore()) to put the previous handlers back. Handlers can only be set in the
    main thread; elsewhere the request is inert (never set)."""

    def __init__(self, command: str = "fdfast", announce: bool = True, phase: str = "steps"):
        self.command, self.announce = command, announce  # announce: say so on stderr (rank 0 only)
        self.phase = phase
        self.signum: int | None = None
        self.received_at = 0.0  # time.monotonic() of the first signal
        self.previous = {}
        raise_deferred()
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "another rank's signal"

    def check_setup(self) -> None:
        """A set-up signal not raised yet (it came during an import) or whose KeyboardInterrupt some library
        swallowed (a bare ``except:``) ends the run here."""
        if self.phase == "setup" and self.signum is not None:
            raise KeyboardInterrupt(_setup_message(self.signum))

    def begin_steps(self) -> None:
        """Set-up is over (checked once more): from now on a signal stops the run after a step."""
        self.check_setup()
        self.phase = "steps"

    def finishing(self) -> None:
        """The last step is done: a signal lets the final files be written."""
        self.phase = "final"

    def _handle(self, signum, frame) -> None:
        now, name = time.monotonic(), signal.Signals(signum).name
        if self.phase == "setup":
            self.signum = self.signum or signum  # kept: raised now, or at check_setup if not now / swallowed
            if not _importing(frame):
                raise KeyboardInterrupt(_setup_message(signum))
            return
        if self.signum is None:
            self.signum, self.received_at = signum, now
            then = "writing the final files first" if self.phase == "final" else "stopping after this step"
            self._say(f"{self.command}: {name}: {then} (send it again to abort now)")
        elif now - self.received_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt(f"aborted by a second {name}; the newest committed checkpoint is intact")

    def _say(self, line: str) -> None:
        # os.write, not print: a handler that runs while the main thread is inside a buffered stderr write
        # would make print raise "reentrant call"
        if self.announce:
            os.write(2, (line + "\n").encode())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _setup_message(signum: int) -> str:
    return (f"stopped by {signal.Signals(signum).name} during set-up, before the first step; nothing new was "
            f"committed")


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import. An exception raised there breaks more than the import:
    torch's C++ start-up aborts (SIGABRT), numpy's recurses, a pybind11 module turns it into "ImportError:
    initialization failed", and an interrupted PyRun_* call (optree's start-up) makes CPython end the process by
    SIGINT whatever exit code it returns. So a signal there is noted and raised after the import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_NOTED: list[int] = []  # start-up signals (startup_interrupts) not raised yet, or maybe swallowed


def _interrupt_at_once(signum, frame) -> None:
    _NOTED.append(signum)  # forgotten once the command line handled the exception (startup_interrupts)
    if not _importing(frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name} during start-up; nothing was written")


def raise_deferred() -> None:
    """Raise a start-up signal that came during an import (or whose KeyboardInterrupt some library swallowed with
    a bare ``except:``): called once the imports are done and where a run starts, so it still ends the run before
    any work."""
    if _NOTED:
        signum = _NOTED[0]
        _NOTED.clear()
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name} during start-up; nothing was written")


@contextlib.contextmanager
def startup_interrupts(exiting: bool = False):
    """The command line's setting while it runs: SIGTERM ends the process as Ctrl-C does (KeyboardInterrupt, which
    the CLI turns into one line and exit 130) wherever no run's StopRequest has taken over, from the slow imports
    on; a signal during an import is only noted, and raised by ``raise_deferred`` once the imports are done.

    On exit the previous handlers are put back (the CLI's ``main`` may be called in a test process), unless
    ``exiting``: the process ends with the block (the command line's own run), and the stop signals are ignored
    from then on, so that one landing in the interpreter's exit (loader workers joined, modules torn down) cannot
    turn a command that has finished into a kill by signal with no line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt_at_once) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)
        _NOTED.clear()
