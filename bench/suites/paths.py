"""Which implementation a call really ran: fdfast's path functions are wrapped for the length of one call and
the ones entered are named (not predicted from the inputs: a fallback shows as what it is)."""
from __future__ import annotations

import contextlib
import functools

import fdfast.kernels.fd_loss as fd_loss_module
import fdfast.kernels.rpb_attention as attention_module

# module-level functions each dispatch calls by name -> the path's name in the bench rows
LOSS_PATHS = {"_fd_loss_triton": "triton", "_fd_loss_torch": "torch", "fd_loss_reference": "reference"}
ATTENTION_PATHS = {"_launch": "triton", "_sdpa": "sdpa", "_cpu_low_precision_attention": "cpu_low_precision",
                   "rpb_attention_reference": "reference"}


@contextlib.contextmanager
def _spied(module, paths: dict, taken: list):
    saved = {name: getattr(module, name) for name in paths}

    def spy(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            taken.append(paths[name])
            return fn(*args, **kwargs)
        return wrapped

    try:
        for name, fn in saved.items():
            setattr(module, name, spy(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def dispatched(kind: str, call) -> str:
    """The path(s) ``call()`` went through, "+"-joined in order ("none" if it reached no fdfast path).
    kind: "loss" or "attention"."""
    module, paths = (fd_loss_module, LOSS_PATHS) if kind == "loss" else (attention_module, ATTENTION_PATHS)
    taken: list = []
    with _spied(module, paths, taken):
        call()
    return "+".join(dict.fromkeys(taken)) or "none"
