"""The checkpointer: a run's whole state to a committed step folder and back, for every parallelism; commit, prune.

    ckpt = Checkpointer(out_dir, rt.info, fmt="full" | "dcp", keep=2, async_save=True)
    ckpt.save(step, run, loop_state)        # a collective: every rank calls it
    loop_state = ckpt.load(path, run)       # any world size; the same format either way
    tensors = ckpt.model_tensors(run)       # the trainable tensors, gathered in full (rank 0)

What is stored (fdfast.checkpoint has the on-disk layout and its integrity rules):
- model tensors in the task's key layout: ``run.task.checkpoint_layout()`` maps a key prefix to a module (FD:
  "student." -> the student, "" -> the projection's "proj.*"; fine-tuning: "model." / "ema."); the checkpointer
  knows no layout of its own. Full format: one safetensors file gathered on rank 0; DCP: each rank its shards.
- the optimizer (full: inside train_state.pt; DCP: sharded beside the model), the loop's state (step,
  scheduler, scaler, loader position, config) and every rank's RNG streams (torch, CUDA, NumPy, Python).
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from fdfast import checkpoint as ckpt
from fdfast import io
from fdfast.distributed import DistInfo, all_gather_object
from fdfast.errors import FDFastError
from fdfast.io import atomic_save_safetensors, fsync_dir


def checkpoint_format(fmt: str, strategy: str, world_size: int) -> str:
    """ckpt.format auto: DCP when FSDP2 really shards (strategy fsdp on more than one rank), else full."""
    if fmt != "auto":
        return fmt
    return "dcp" if strategy == "fsdp" and world_size > 1 else "full"


# ----------------------------------------------------------------------------- model tensors in the task's layout
def _sharded(strategy: str, info: DistInfo) -> bool:
    return info.world_size > 1 and strategy == "fsdp"


def model_state(layout: dict, full: bool, sharded: bool) -> dict:
    """{prefix + key: tensor} of every module in ``layout``; ``full``: gathered CPU tensors (a collective under
    FSDP2, whose result rank 0 keeps), else each rank's own part (DTensor shards under FSDP2)."""
    out = {}
    for prefix, module in layout.items():
        if sharded or not full:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            part = get_model_state_dict(module, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
        else:
            part = module.state_dict()
        out.update({prefix + k: v for k, v in part.items()})
    return out


def split_by_layout(tensors: dict, layout: dict) -> dict:
    """{prefix: {key: tensor}}: each key to the longest prefix of ``layout`` it starts with."""
    prefixes = sorted(layout, key=len, reverse=True)
    parts = {p: {} for p in layout}
    for k, v in tensors.items():
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            raise FDFastError(f"checkpoint key {k!r} belongs to none of {sorted(layout)}; it was written for "
                              f"another kind of run")
        parts[prefix][k[len(prefix):]] = v
    return parts


def load_model_state(layout: dict, tensors: dict, full: bool, sharded: bool, source) -> None:
    """Inverse of model_state, strict: a missing, unexpected or misshaped key is one FDFastError listing them."""
    from fdfast.models.convert import load_strict_check
    for prefix, part in split_by_layout(tensors, layout).items():
        module = layout[prefix]
        if sharded or not full:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(module, part, options=StateDictOptions(full_state_dict=full, strict=True))
        else:
            load_strict_check(module, part, f"checkpoint {source} tensors {prefix or '(projection)'}*",
                              "resume with the config that wrote it")
            module.load_state_dict(part, strict=True)


# ----------------------------------------------------------------------------- RNG streams
def rng_state(device: torch.device) -> dict:
    """This process's RNG streams as plain tensors and numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rng(saved: list[dict], path: Path, info: DistInfo, command: str) -> None:
    """Rank r takes the stream rank r saved (drop-path masks and mixing as if never interrupted); on another world
    size the ranks beyond the saved ones keep their fresh seeds, and rank 0 says so in one line."""
    if info.rank < len(saved):
        set_rng_state(saved[info.rank], info.device)
    if len(saved) != info.world_size and info.is_main:
        n, w = len(saved), info.world_size
        span = (lambda a, b: f"rank {a}" if a == b else f"ranks {a}-{b}")(min(n, w), max(n, w) - 1)
        lost = f"{span} start fresh RNG streams" if w > n else f"the RNG streams of {span} are dropped"
        print(f"{command}: {path.name} was saved by {n} rank{'s' * (n > 1)}, resumed on {w}: weights, optimizer "
              f"and schedule are restored, {lost}, so drop-path masks and the data order differ from an "
              f"uninterrupted run", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the component
class Checkpointer:
    """Saves and loads committed step folders of one run directory (``fmt`` "full" or "dcp", already resolved)."""

    def __init__(self, run_dir: Path | None, info: DistInfo, fmt: str, keep: int, async_save: bool,
                 strategy: str, command: str = "fdfast"):
        self.run_dir, self.info, self.fmt, self.keep = (Path(run_dir) if run_dir else None), info, fmt, keep
        self.strategy, self.command = strategy, command
        self.dcp = DcpWriter(self.run_dir, info, keep, async_save) if fmt == "dcp" and run_dir else None
        self.branch = 0  # the run's branch (fdfast.checkpoint lineage), recorded in each COMMITTED

    def set_branch(self, branch: int) -> None:
        self.branch = branch
        if self.dcp is not None:
            self.dcp.branch = branch

    def _sharded(self) -> bool:
        return _sharded(self.strategy, self.info)

    def save(self, step: int, run, loop_state: dict, meta: dict) -> None:
        """Checkpoint step-N (a collective). Full: rank 0 writes the gathered state and commits it. DCP: every rank
        writes its shards, maybe in the background, committed by the next save / ``wait()``."""
        state = dict(loop_state, step=step, world_size=self.info.world_size,
                     rng=all_gather_object(rng_state(self.info.device), self.info))  # one stream per rank
        layout = run.task.checkpoint_layout()
        if self.dcp is not None:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
            # before the first step AdamW has no moments yet: this fills zeros (a zero-lr step) for DCP to load into
            sharded = {"model": model_state(layout, full=False, sharded=True),
                       "optim": get_optimizer_state_dict(run.task, run.optimizer)}
            self.dcp.save(step, sharded, state if self.info.is_main else None)
            return
        tensors = model_state(layout, full=True, sharded=self._sharded())
        state["optimizer"] = self.full_optimizer_state(run)
        if self.info.is_main:
            save_full(self.run_dir, step, tensors, state, meta, self.keep, self.branch)

    def full_optimizer_state(self, run) -> dict:
        if not self._sharded():
            return run.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(run.task, run.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, path: Path, run) -> dict:
        """Restore ``run`` (task tensors, optimizer, scheduler, scaler, loader, RNG) from a committed step folder
        of either format, written on any world size; returns the loop state stored with it."""
        path = Path(path)
        state = ckpt.load_train_state(path)
        layout = run.task.checkpoint_layout()
        if ckpt.is_dcp(path):  # each rank reads the pieces of its own shards, whatever world size wrote them
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                                 set_optimizer_state_dict)
            sharded = {"model": model_state(layout, full=False, sharded=True),
                       "optim": get_optimizer_state_dict(run.task, run.optimizer)}
            load_sharded(path, sharded)
            load_model_state(layout, sharded["model"], full=False, sharded=True, source=path)
            set_optimizer_state_dict(run.task, run.optimizer, sharded["optim"], options=StateDictOptions(strict=True))
        else:
            load_model_state(layout, ckpt.load_model_tensors(path), full=True, sharded=self._sharded(), source=path)
            if self._sharded():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(run.task, run.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True, strict=True))
            else:
                run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        run.loader.load_state_dict(state["loader"])
        restore_rng(state["rng"], path, self.info, self.command)
        return state

    def model_tensors(self, run) -> dict:
        """The task's trainable tensors in full (a collective under FSDP2; rank 0 holds the result)."""
        return model_state(run.task.checkpoint_layout(), full=True, sharded=self._sharded())

    def wait(self) -> None:
        """Commit a DCP save still being written (a collective; a no-op for the full format)."""
        if self.dcp is not None:
            self.dcp.wait()


# ----------------------------------------------------------------------------- full format: rank 0 writes
def save_full(run_dir: Path, step: int, model_tensors: dict, train_state: dict, meta: dict, keep: int,
              branch: int = 0) -> Path:
    """Save step-N atomically: files into a temporary folder, COMMITTED into it last, then one rename (commit)."""
    try:
        tmp = fresh_tmp(run_dir, step)
        atomic_save_safetensors(model_tensors, tmp / "model.safetensors",
                                metadata={ckpt.STUDENT_META_KEY: json.dumps(meta)})
        save_train_state(train_state, tmp)
        return commit(run_dir, step, tmp, ckpt.records(tmp), "full", keep, branch)
    except (OSError, io.WriteFailed) as e:  # a full disk (ENOSPC), a quota, an I/O error, a read-only folder
        raise unwritable(run_dir, step, e) from None


def unwritable(run_dir: Path, step: int, error: BaseException) -> FDFastError:
    """The one-line error for a checkpoint that could not be written; its partial folder is removed first (the
    committed ones are never touched), so the disk is not left fuller and --resume auto finds the newest."""
    error = error.error if isinstance(error, io.WriteFailed) else error
    root = Path(run_dir) / "checkpoints"
    partial = root / f".tmp-step-{step}"
    if partial.is_dir():
        io.remove_tree(partial, ignore_errors=True)
    fix = io.WriteFailed(root, error).fix if isinstance(error, OSError) else "check the disk"
    return FDFastError(f"cannot write checkpoint step-{step} in {root}: {getattr(error, 'strerror', None) or error}; "
                       f"{ckpt.where_to_resume(run_dir)}: {fix}, then --resume auto")


def fresh_tmp(run_dir: Path, step: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}"  # one name for every rank (DCP); the run-dir lock keeps other runs out
    io.remove_tree(tmp, ignore_errors=True)  # a killed save's: its marker may be in it
    tmp.mkdir()
    return tmp


def save_train_state(state: dict, folder: Path) -> None:
    with open(folder / "train_state.pt", "wb") as f:
        torch.save(state, f)  # fsynced with the folder when it is published (commit)


def commit(run_dir: Path, step: int, tmp: Path, files: dict, fmt: str, keep: int, branch: int = 0) -> Path:
    """Publish a finished temporary step folder as step-N, then prune the branch.

    COMMITTED (files, step, format, branch, the commit's sequence number) is written into the folder last, and one
    rename puts the folder in place (``io.publish_dir``, fsynced): a step-N being saved again (a run resumed at
    its last step) is renamed aside first and removed only once the new one is in, so there is no moment without
    a committed step-N; ``checkpoint.recover`` finishes or rolls back a swap a crash cut short."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    ckpt.write_marker(tmp, files, step=step, format=fmt, branch=branch, seq=ckpt.next_seq(run_dir))
    io.publish_dir(tmp, final, complete=ckpt.is_committed)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` committed steps of the current branch, newest by commit order (the sequence number
    in COMMITTED; the step number for markers without one). Each older one is renamed out of sight (a temporary
    name ``recover`` removes) before its files are deleted: a kill in between never leaves a marker on half a
    folder. Returns what was removed."""
    if keep <= 0:
        return []
    root = Path(run_dir) / "checkpoints"
    steps = sorted(ckpt.committed_steps(run_dir), key=lambda sd: (ckpt.marker_field(sd[1], "seq"), sd[0]))
    gone = []
    for _, old in steps[:-keep]:
        doomed = root / f".tmp-pruned-{old.name.lstrip('.')}"
        os.rename(old, doomed)
        gone.append(old)
        io.remove_tree(doomed, ignore_errors=True)
    if gone:
        fsync_dir(root)
    return gone


# ----------------------------------------------------------------------------- DCP: every rank writes its shards
def load_sharded(ckpt_dir: Path, state_dict: dict) -> None:
    """Fill ``state_dict`` (DTensor shards or whole tensors) in place from a DCP step; a collective when a process
    group is up. DCP reshards: any world size may have written it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    with ckpt.quiet_dcp():
        dcp.load(state_dict, checkpoint_id=str(Path(ckpt_dir) / ckpt.DCP_DIR), no_dist=not dist.is_initialized())


class DcpWriter:
    """DCP checkpoints inside the atomic protocol: every rank writes its shards into .tmp-step-N/dcp (in a
    background thread with ``async_save`` under a process group); ``wait()`` (a collective: next save, end of run,
    stop) waits for them, gathers each rank's file records and lets rank 0 rename the folder and write COMMITTED
    last."""

    def __init__(self, run_dir: Path, info: DistInfo, keep: int, async_save: bool):
        import torch.distributed as dist
        self.run_dir, self.info, self.keep = Path(run_dir), info, keep
        self.rank, self.world = info.rank, info.world_size
        self.async_save, self.pending = async_save, None
        self.branch = 0  # the run's branch, recorded in each COMMITTED (set by the loop once it is known)
        # async writes run their own collectives: a separate gloo group keeps them off the training stream
        self.group = dist.new_group(backend="gloo") if self.world > 1 and self.async_save else None

    def save(self, step: int, state_dict: dict, train_state: dict | None) -> None:
        """Start saving step-N (``train_state`` from rank 0; None elsewhere)."""
        import torch.distributed.checkpoint as dcp
        self.wait()
        tmp = self.run_dir / "checkpoints" / f".tmp-step-{step}"
        try:
            if self.rank == 0:
                tmp = fresh_tmp(self.run_dir, step)
                save_train_state(train_state, tmp)
            self._barrier()
            where = str(tmp / ckpt.DCP_DIR)
            with ckpt.quiet_dcp():
                if self.async_save:
                    future = dcp.async_save(state_dict, checkpoint_id=where, process_group=self.group,
                                            no_dist=self.world == 1)
                else:
                    dcp.save(state_dict, checkpoint_id=where, no_dist=self.world == 1)
                    future = None
        except (OSError, dcp.api.CheckpointException) as e:
            raise self._failed(step, e) from None
        self.pending = (step, tmp, future)
        if not self.async_save:
            self.wait()

    def wait(self) -> Path | None:
        """Finish the pending save (collective); returns the committed step directory on rank 0."""
        if self.pending is None:
            return None
        step, tmp, future = self.pending
        self.pending = None
        if future is not None:
            from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
            try:
                getattr(future, "upload_completion", future).result()
            except (Exception, CheckpointException) as e:  # the writer thread's OSError, or DCP's wrapper of it
                raise self._failed(step, e) from None
        own = sorted(f"{ckpt.DCP_DIR}/{p.name}" for p in (tmp / ckpt.DCP_DIR).glob(f"__{self.rank}_*"))
        files = self._gather(ckpt.records(tmp, own))
        if self.rank != 0:
            self._barrier()
            return None
        files.update(ckpt.records(tmp, exclude=files))  # DCP's .metadata, train_state.pt
        final = commit(self.run_dir, step, tmp, dict(sorted(files.items())), "dcp", self.keep, self.branch)
        self._barrier()
        return final

    def _failed(self, step: int, e: BaseException) -> FDFastError:
        """One line, as for the full format; the partial folder is removed, committed ones stay."""
        err = e if isinstance(e, OSError) else OSError(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
        return unwritable(self.run_dir, step, err)

    def _gather(self, mine: dict) -> dict:
        return {k: v for d in all_gather_object(mine, self.info) for k, v in d.items()}

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

