"""The fault loop (issues 14, 17, 24): kill `fdfast train` / `fdfast finetune` at chosen moments, resume, compare.

Each trial runs tiny runs in their own session and sends SIGKILL or SIGTERM to the whole process group (as SLURM
preemption, a pod deletion or Ctrl-C do: main process and loader worker alike), then `--resume auto`, maybe
interrupted again, until a run ends. The trial kinds:

- startup     the first interruption during start-up (imports, teacher, building the run);
- step        a random moment of training;
- checkpoint  right when a checkpoint folder is being written (its temporary folder appeared);
- swap        a finished run resumed at its last step commits that step again: the kill lands in the middle of the
              swap (old copy aside, or new copy in with the old one not yet removed); a wrapper pauses the
              process there (helpers_signals.py pause-swaps) so that the kill is sure to hit it;
- explicit    a finished run resumed with `--resume .../step-9` and a change (drop path 0.2, a checkpoint every
              step): the branch it leaves (step 12, the final student) must never be used again, by the resumes
              that follow nor by pruning;
- finetune    `fdfast finetune` of the reference student, killed at random moments.

Later interruptions of a trial land at random moments (start-up, training, checkpoint). A trial passes when
- after every kill, each COMMITTED marker (current branch and abandoned ones, the final student's record) matches
  its files: no marker ever sits on an incomplete folder;
- the run ends with its final student (fine-tuning: model.safetensors and best.safetensors) bitwise equal to an
  uninterrupted run of the same branch; nothing temporary is left;
- explicit: no step of the abandoned branch was resumed from or kept in the current branch.

Run as a script for a report (one JSON line per trial, then a summary): python bench/fault_loop.py --trials 40
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # script mode: the helpers beside this file
from helpers_signals import GroupRun, pause_swaps_argv  # noqa: E402

STEPS, EVERY = 12, 3  # checkpoints at steps 3, 6, 9 (+ the final 12): a kill may land before any of them
FORK = 9  # the explicit kind resumes from step-9 (kept with keep=2) and leaves step 12 behind
BRANCH_B = ("--set", "model.drop_path=0.2", "--set", "ckpt.every=1")  # the explicit branch trains differently
FT_EPOCHS = 4  # x 3 steps (12 images, batch 4): 12 fine-tuning steps, a checkpoint per epoch
MAX_ATTEMPTS = 8  # runs per trial (the first + resumes) before the trial counts as stuck
KINDS = ("startup", "step", "checkpoint", "swap", "explicit", "finetune")
MODES = ("startup", "step", "checkpoint")
ENV = {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RESUMED = re.compile(r"resuming from .*step-(\d+) \(step (\d+), branch (\d+)\)")


# ----------------------------------------------------------------------------- the runs
def train_argv(out: Path, teacher_file: Path, image_dir: Path, *extra: str) -> list[str]:
    """`python -m fdfast train` on the tiny ViT of the other tests, torch loader with one worker process."""
    from test_train import tiny_args
    args = tiny_args(out, teacher_file, image_dir, STEPS, "--set", f"ckpt.every={EVERY}", "--set", "ckpt.keep=2",
                     "--set", "data.num_workers=1", *extra)  # progress: a "step N/12" line per step on stderr
    return [sys.executable, "-m", "fdfast", *args]


def finetune_argv(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """`python -m fdfast finetune` of a student on a 3-class set at 32 px, one loader worker, a row per step."""
    return [sys.executable, "-m", "fdfast", "finetune", str(model), "--data", str(data), "--out", str(out),
            "--epochs", str(FT_EPOCHS), "--batch-size", "4", "--set", "data.num_workers=1", "--set",
            "optim.warmup_epochs=1", "--set", "runtime.log_every=1", "--set", "runtime.precision=fp32", *extra]


class Setup:
    """The inputs of every trial and the uninterrupted runs they compare with."""

    def __init__(self, work: Path, teacher_file: Path, image_dir: Path, ft_data: Path):
        self.work, self.teacher, self.images, self.ft_data = work, teacher_file, image_dir, ft_data
        self.timing: dict[str, dict] = {}
        # the runs import this checkout's fdfast (`python -m fdfast` from its root), not an installed copy
        import subprocess
        where = subprocess.run([sys.executable, "-c", "import fdfast, fdfast.kernels; print(fdfast.__file__); "
                                "print(fdfast.kernels.__file__)"], capture_output=True, text=True, check=True,
                               env={**os.environ, **ENV}).stdout.split()
        self.imports = {"fdfast": where[0], "fdfast.kernels": where[1]}
        assert Path(where[0]).resolve().parents[1] == Path(__file__).resolve().parents[1], where
        self.fd = self._reference("fd", work / "reference", self.train)  # also: the run the swap / explicit kinds copy
        self.ft_model = self.fd / "student.safetensors"
        self.branch_b = work / "reference-branch-b"
        shutil.copytree(self.fd, self.branch_b)
        self._reference("explicit", self.branch_b, lambda out: self.explicit(out))
        self.ft = self._reference("ft", work / "reference-ft", self.finetune)
        assert not same_files(self.fd, self.branch_b, ["student.safetensors"]), "branch B must differ to be checked"

    def train(self, out: Path, *extra: str) -> list[str]:
        return train_argv(out, self.teacher, self.images, *extra)

    def explicit(self, out: Path) -> list[str]:
        return self.train(out, "--resume", str(out / "checkpoints" / f"step-{FORK}"), *BRANCH_B)

    def finetune(self, out: Path, *extra: str) -> list[str]:
        return finetune_argv(out, self.ft_model, self.ft_data, *extra)

    def _reference(self, name: str, out: Path, argv) -> Path:
        t0 = time.monotonic()
        run = GroupRun(argv(out), self.work / f"{name}-logs", env=ENV)
        run.wait_for(lambda: training(run), timeout=600)
        t1 = time.monotonic()
        rc = run.wait(timeout=600)
        assert rc == 0, run.stderr[-3000:]
        self.timing[name] = {"start_s": round(t1 - t0, 2), "train_s": round(time.monotonic() - t1, 2)}
        return out


def training(run: GroupRun) -> bool:
    """The run has logged a step (the progress line ``step N/12``): start-up is over."""
    return f"/{STEPS}  loss" in run.stderr


def logged_steps(run: GroupRun) -> list[int]:
    return [int(n) for n in re.findall(rf"step (\d+)/{STEPS}  loss", run.stderr)]


# ----------------------------------------------------------------------------- what a kill may leave
def in_flight(out: Path, since: float = 0.0) -> list[str]:
    """Checkpoint folders being written (.tmp-step-N, changed after the time ``since``, so that a leftover of an
    earlier kill does not count as a save in progress)."""
    root, found = out / "checkpoints", []
    for d in root.iterdir() if root.is_dir() else ():
        try:
            if d.name.startswith(".tmp-step-") and d.stat().st_mtime > since:
                found.append(d.name)
        except FileNotFoundError:  # renamed or removed while we looked
            pass
    return sorted(found)


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders, swap asides and unmarked step folders (after a finished run: none)."""
    from fdfast import io
    from fdfast.checkpoint import STEP_DIR, is_committed
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if io.is_temp_name(p.name) or p.name.endswith(io.ASIDE_SUFFIX)
                  or (STEP_DIR.match(p.name) and p.is_dir() and not is_committed(p)))


def committed_but_damaged(out: Path) -> list[str]:
    """Every COMMITTED marker (steps of every branch, the final student's) whose files do not match it."""
    from fdfast import checkpoint as ckpt
    return [f"{m.parent.relative_to(out)}: {why}" for m in sorted(out.rglob(ckpt.COMMITTED))
            if (why := ckpt.damage(m.parent)) is not None]


def same_files(a: Path, b: Path, names) -> bool:
    import torch
    from safetensors.torch import load_file
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


# ----------------------------------------------------------------------------- one interruption
def interrupt(run: GroupRun, out: Path, rng: random.Random, timing: dict, mode: str, sig: int | None = None,
              flags: Path | None = None, swap_point: int = 1) -> dict:
    """Wait for the moment ``mode`` names, signal the whole group (``sig``, else SIGTERM or SIGKILL at random),
    wait for it to end; returns what happened."""
    sig = sig or rng.choice([signal.SIGTERM, signal.SIGKILL])
    t0 = time.monotonic()
    event = {"signal": signal.Signals(sig).name, "mode": mode}
    if mode == "startup":
        wait_until(run, lambda: False, rng.uniform(0.1, timing["start_s"]))
        if sig == signal.SIGTERM:  # not before the interpreter ran fdfast's first lines (GroupRun.catches)
            wait_until(run, lambda: run.catches(sig), 60)
    elif mode == "swap":  # paused after the old copy went aside (1) or after the new one went in (2)
        event["swap_point"] = swap_point
        wait_until(run, lambda: (flags / f"swap-{swap_point}").exists(), 2 * timing["start_s"] + 120)
    else:
        wait_until(run, lambda: training(run), 2 * timing["start_s"] + 60)
        if mode == "step":  # a random step of those this run has left, then a moment inside the next one
            first = min(logged_steps(run) or [STEPS])
            target = rng.randint(first, max(first, STEPS - 1))
            wait_until(run, lambda: max(logged_steps(run) or [0]) >= target, 2 * timing["train_s"] + 60)
            wait_until(run, lambda: False, rng.uniform(0, 0.2))
            event["after_step"] = target
        else:
            since = time.time()
            wait_until(run, lambda: bool(in_flight(out, since)), 2 * timing["train_s"] + 60, poll=0.001)
    event["after_s"] = round(time.monotonic() - t0, 3)
    if run.proc.poll() is not None:  # the run ended before the moment came
        event.update(rc=run.proc.returncode, missed=True)
        return event
    run.killpg(sig)
    event["rc"] = run.wait(timeout=300)
    if event["rc"] == 0 and sig == signal.SIGKILL:  # it ended between our last look and the signal
        event["missed"] = True
    event["group_left"] = run.group_alive(grace=15)  # a worker outliving the main process (seconds: a loaded machine)
    if event["group_left"]:
        run.kill()
    event["in_flight"] = in_flight(out)  # what the kill cut off (SIGKILL during a save leaves these)
    event["damaged"] = committed_but_damaged(out)
    event["traceback"] = "Traceback" in run.stderr
    from fdfast import checkpoint as ckpt
    event["committed"] = [s for s, _ in ckpt.committed_steps(out)]
    return event


def wait_until(run: GroupRun, ready, seconds: float, poll: float = 0.01) -> None:
    """Until ready(), `seconds` passed, or the run ended."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and run.proc.poll() is None and not ready():
        time.sleep(poll)


# ----------------------------------------------------------------------------- one trial
def trial(index: int, kind: str, s: Setup, seed: int = 0) -> dict:
    """One trial of ``kind``: its interruptions, each followed by a resume, until a run ends; then the checks."""
    rng = random.Random(seed * 1000 + index)
    out = s.work / f"trial-{index:02d}-{kind}"
    timing = s.timing["ft" if kind == "finetune" else "fd"]
    kills = 1 if kind == "swap" else rng.randint(1, 3)
    if kind in ("swap", "explicit"):  # a finished run, as the uninterrupted reference left it
        shutil.copytree(s.fd, out)
    events, resumes, final_rc, switched = [], [], None, kind != "explicit"
    for attempt in range(MAX_ATTEMPTS):
        flags = s.work / f"trial-{index:02d}-flags-{attempt}"
        if kind == "finetune":
            argv = s.finetune(out, *(("--resume", "auto") if attempt else ()))
        elif kind == "explicit":  # the branch switch is repeated until a run made it (the user's same command)
            argv = s.train(out, "--resume", "auto", *BRANCH_B) if switched else s.explicit(out)
        elif kind == "swap" and attempt == 0:
            argv = pause_swaps_argv(s.train(out, "--resume", "auto"), flags, pause_s=30)
        else:
            argv = s.train(out, *(("--resume", "auto") if attempt else ()))
        run = GroupRun(argv, s.work / f"trial-{index:02d}-logs-{attempt}", env=ENV)
        if attempt < kills:
            mode = "swap" if kind == "swap" else kind if attempt == 0 and kind in MODES else rng.choice(MODES)
            # the first interruption of each kind alternates SIGKILL / SIGTERM (and the swap's two points) over its
            # trials, so that every pairing is covered; later ones are drawn at random
            nth = index // len(KINDS)
            sig = (signal.SIGKILL, signal.SIGTERM)[nth % 2] if attempt == 0 else None
            events.append(interrupt(run, out, rng, timing, mode, sig, flags, swap_point=1 + (nth // 2) % 2))
            rc = events[-1]["rc"]
        else:
            rc = run.wait(timeout=600)
        resumes += [tuple(map(int, m)) for m in RESUMED.findall(run.stderr)]  # (folder step, step, branch)
        switched = switched or "left the current branch" in run.stderr
        if rc == 0:
            final_rc = 0
            break
        if attempt >= kills or not events or events[-1].get("missed"):
            final_rc = rc
            return dict(trial=index, kind=kind, events=events, attempts=attempt + 1, final_rc=rc, equal=False,
                        stderr=run.stderr[-1500:])
    result = dict(trial=index, kind=kind, events=events, attempts=attempt + 1, final_rc=final_rc,
                  leftovers=leftovers(out), damaged=committed_but_damaged(out))
    if kind == "finetune":
        result["equal"] = same_files(out, s.ft, ["model.safetensors", "best.safetensors"])
    else:
        result["equal"] = same_files(out, s.branch_b if kind == "explicit" else s.fd, ["student.safetensors"])
    if kind == "explicit":
        result["abandoned_used"] = abandoned_used(out, resumes)
    return result


def abandoned_used(out: Path, resumes: list[tuple]) -> list[str]:
    """Steps of the branch left behind that were resumed from or kept in the current branch (the invariant: none)."""
    from fdfast import checkpoint as ckpt
    used = [f"resumed from step {step} of branch {branch}" for _, step, branch in resumes
            if step > FORK and branch == 0]
    used += [f"checkpoints/{d.name} of branch 0" for s, d in ckpt.committed_steps(out)
             if s > FORK and ckpt.marker_field(d, "branch") == 0]
    left = [d for d in (out / "checkpoints").glob(f"{ckpt.ABANDONED_PREFIX}*/step-{STEPS}")]
    if not left:
        used.append("the abandoned step 12 is not kept in checkpoints/abandoned-*")
    return used


def passed(result: dict) -> bool:
    """The run ended equal to its reference with nothing damaged or left over; every kill left every marker
    intact and no worker behind; every SIGTERM ended the run in one line with exit 130 (0: it came after the last
    step, and the final files were written)."""
    clean = all(not e.get("damaged") and not e.get("group_left") and
                (e["signal"] != "SIGTERM" or e.get("missed") or (e["rc"] in (0, 130) and not e["traceback"]))
                for e in result["events"])
    return (result["final_rc"] == 0 and result["equal"] and not result.get("damaged") and not result.get("leftovers")
            and not result.get("abandoned_used") and clean)


# ----------------------------------------------------------------------------- the loop
def run_loop(trials: int, s: Setup, seed: int = 0, log=print) -> list[dict]:
    log(json.dumps({"reference": s.timing, "imports": s.imports}))
    results = []
    for i in range(trials):
        results.append(trial(i, KINDS[i % len(KINDS)], s, seed))
        log(json.dumps(results[-1]))
    return results


def _count(events: list[dict], key: str) -> dict:
    return {str(v): sum(e.get(key) == v for e in events) for v in sorted({e.get(key) for e in events}, key=str)}


def summary(results: list[dict]) -> dict:
    by_kind = {}
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        hit = [e for r in rs for e in r["events"] if not e.get("missed")]
        by_kind[kind] = {"trials": len(rs), "passed": sum(map(passed, rs)), "interruptions": len(hit),
                         "missed": sum(e.get("missed", False) for r in rs for e in r["events"]),
                         "by_signal": _count(hit, "signal"), "by_moment": _count(hit, "mode"),
                         "exit_codes": _count(hit, "rc"), "resumes": sum(r["attempts"] - 1 for r in rs)}
    hit = [e for r in results for e in r["events"] if not e.get("missed")]
    return {
        "trials": len(results), "passed": sum(map(passed, results)), "interruptions": len(hit),
        "by_kind": by_kind, "by_signal": _count(hit, "signal"), "exit_codes": _count(hit, "rc"),
        "cut_a_save": sum(bool(e["in_flight"]) for e in hit),
        "sigterm_tracebacks": sum(e["traceback"] for e in hit if e["signal"] == "SIGTERM"),
        "sigterm_exit_not_130_or_0": sum(e["rc"] not in (0, 130) for e in hit if e["signal"] == "SIGTERM"),
        "before_first_checkpoint": sum(not e["committed"] for e in hit),
        "workers_left_behind": sum(bool(e["group_left"]) for e in hit),
        "leftover_partial_folders": sum(bool(r.get("leftovers")) for r in results),
    }


@pytest.mark.slow
def test_fault_loop(tmp_path, teacher_file, image_dir, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))
    results = run_loop(40, Setup(tmp_path, teacher_file, image_dir, finetune_data(tmp_path / "ft-data")))
    report = summary(results)
    print(json.dumps(report))
    assert report["trials"] == 40 and report["interruptions"] >= 40
    assert all(report["by_kind"][k]["trials"] >= 6 for k in KINDS)
    assert report["sigterm_exit_not_130_or_0"] == 0 and report["workers_left_behind"] == 0
    assert [r["trial"] for r in results if not passed(r)] == [], [r for r in results if not passed(r)]


# ----------------------------------------------------------------------------- script mode
def finetune_data(root: Path) -> Path:
    """train/ and val/ of 3 colour classes (test_finetune's set)."""
    from test_finetune import _colour_set
    _colour_set(root / "train", per_class=4, seed=0)
    _colour_set(root / "val", per_class=2, seed=1)
    return root


def _fixtures(work: Path) -> tuple[Path, Path]:
    """The conftest fixtures' tiny teacher file and image folder, made without pytest."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    teacher = work / "teacher" / "vit_tiny.safetensors"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    save_file(m.state_dict(), str(teacher))
    images = work / "images"
    images.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand(40 + i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"img{i}.jpg")
    return teacher, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True, help="work folder (runs, logs, results.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", type=Path, help="also write the summary (JSON) here")
    args = parser.parse_args(argv)
    os.environ.update(ENV, FDFAST_CACHE=str(args.out / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, images = _fixtures(args.out)
    setup = Setup(args.out, teacher, images, finetune_data(args.out / "ft-data"))
    with open(args.out / "results.jsonl", "w") as f:
        def log(line):
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
        results = run_loop(args.trials, setup, args.seed, log)
        report = summary(results)
        log(json.dumps({"summary": report}))
    if args.summary:
        args.summary.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(map(passed, results)) else 1


if __name__ == "__main__":
    sys.exit(main())
